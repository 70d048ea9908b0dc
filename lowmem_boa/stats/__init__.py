"""Calibration statistics: column Hessians and attention-aware row Hessians (pure tensors)."""

from .attention_stats import (attention_grams, block_v_cross_grams, block_v_grams, block_v_row_chunk,
                              causal_attention_probs, cross_gram, gram, qk_row_hessians, rope_average,
                              wout_row_hessian)
from .mlp_stats import gain_grams, mlp_row_group, mlp_row_hessian, residual_token_weights

__all__ = ["attention_grams", "block_v_cross_grams", "block_v_grams", "block_v_row_chunk", "causal_attention_probs",
           "cross_gram", "gain_grams", "gram", "mlp_row_group", "mlp_row_hessian", "qk_row_hessians",
           "residual_token_weights", "rope_average", "wout_row_hessian"]
