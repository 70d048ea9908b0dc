"""Calibration statistics: column Hessians and attention-aware row Hessians (pure tensors)."""

from .attention_stats import (attention_grams, block_v_grams, causal_attention_probs, gram,
                              qk_row_hessians, rope_average, wout_row_hessian)

__all__ = ["attention_grams", "block_v_grams", "causal_attention_probs", "gram", "qk_row_hessians",
           "rope_average", "wout_row_hessian"]
