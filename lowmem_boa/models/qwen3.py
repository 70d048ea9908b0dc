"""Qwen3: Llama-style blocks with RMSNorm on each query/key head (q_norm, k_norm) before RoPE."""

from __future__ import annotations

from .base import AttentionStates
from .llama import LlamaAdapter, apply_rope


class Qwen3Adapter(LlamaAdapter):
    family = "Qwen3"
    model_types = ("qwen3",)
    has_qk_norm = True

    def check_config(self, config) -> None:
        super().check_config(config)
        if getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen3: use_sliding_window=True is not supported")

    def qk_norm_weights(self, block):
        attn = self.attention(block)
        return attn.q_norm.weight.detach().float(), attn.k_norm.weight.detach().float()

    def attention_states(self, block, x, block_kwargs):
        attn = self.attention(block)
        q, k, v = self._project(attn, x)
        q = attn.q_norm(q.transpose(1, 2)).transpose(1, 2)
        k = attn.k_norm(k.transpose(1, 2)).transpose(1, 2)
        cos, sin = block_kwargs["position_embeddings"]
        q, k = apply_rope(q.float(), cos.float(), sin.float()), apply_rope(k.float(), cos.float(), sin.float())
        return AttentionStates(q=q, k=k, v=v.float(), scaling=float(attn.scaling))
