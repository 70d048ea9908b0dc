"""OPT (Zhang et al. 2022): learned positions, LayerNorm, biases, ReLU MLP, multi-head attention."""

from __future__ import annotations


from .base import AttentionStates, ModelAdapter


class OPTAdapter(ModelAdapter):
    family = "OPT"
    model_types = ("opt",)
    blocks_prefix = "model.decoder.layers"
    o_proj = "self_attn.out_proj"
    mlp_in = ("fc1",)
    mlp_out = "fc2"
    final_modules = ("model.decoder.final_layer_norm", "model.decoder.project_out")

    @property
    def intermediate_size(self) -> int:
        return int(self.config.ffn_dim)

    def check_config(self, config) -> None:
        super().check_config(config)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError("OPT: hidden_size must be divisible by num_attention_heads")

    def attention_states(self, block, x, block_kwargs):
        attn = self.attention(block)
        h = self.heads
        # OPT scales the query projection's output before q k^T; keep the unscaled query here
        # and report the scale, so q k^T * scaling equals the model's attention logits.
        q = self._split_heads(attn.q_proj(x).float(), h.n_heads)
        k = self._split_heads(attn.k_proj(x).float(), h.n_kv_heads)
        v = self._split_heads(attn.v_proj(x).float(), h.n_kv_heads)
        return AttentionStates(q=q, k=k, v=v, scaling=float(attn.scaling))
