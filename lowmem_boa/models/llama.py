"""Llama 1/2/3 (and Llama-style models): RoPE, RMSNorm, gated MLP, grouped-query attention."""

from __future__ import annotations

import torch

from .base import AttentionStates, GatedMLP, ModelAdapter


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the "rotate half" convention of Hugging Face Llama-style models.

    ``t`` is ``(B, H, L, head_dim)``, ``cos``/``sin`` are ``(L, head_dim)`` or ``(1, L, head_dim)``.
    """
    cos = cos.reshape(1, 1, *cos.shape[-2:]).to(t.dtype)
    sin = sin.reshape(1, 1, *sin.shape[-2:]).to(t.dtype)
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


class LlamaAdapter(GatedMLP, ModelAdapter):
    family = "Llama"
    model_types = ("llama",)
    blocks_prefix = "model.layers"
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    uses_rope = True

    def check_config(self, config) -> None:
        super().check_config(config)
        layer_types = getattr(config, "layer_types", None) or []
        window = getattr(config, "sliding_window", None)
        if window and any(t == "sliding_attention" for t in layer_types):
            raise ValueError(f"{self.family}: sliding-window attention layers are not supported "
                             f"(config.layer_types contains 'sliding_attention', window {window})")

    def rope_cos_sin(self, block_kwargs, seqlen):
        cos, sin = block_kwargs["position_embeddings"]
        return cos.reshape(-1, cos.shape[-1])[:seqlen], sin.reshape(-1, sin.shape[-1])[:seqlen]

    def _project(self, attn, x):
        h = self.heads
        q = self._split_heads(attn.q_proj(x), h.n_heads)
        k = self._split_heads(attn.k_proj(x), h.n_kv_heads)
        v = self._split_heads(attn.v_proj(x), h.n_kv_heads)
        return q, k, v

    def attention_states(self, block, x, block_kwargs):
        attn = self.attention(block)
        q, k, v = self._project(attn, x)
        cos, sin = block_kwargs["position_embeddings"]
        q, k = apply_rope(q.float(), cos.float(), sin.float()), apply_rope(k.float(), cos.float(), sin.float())
        return AttentionStates(q=q, k=k, v=v.float(), scaling=float(attn.scaling))
