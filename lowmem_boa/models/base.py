"""What the pipeline needs to know about a model family, read from its Hugging Face config.

An adapter never hard-codes a head count: heads, KV heads and head size come from the config.
It names the decoder blocks and their linear layers, groups the layers in the order they are
quantized inside a block (attention projections, out-projection, MLP input, MLP output), and
computes the attention queries/keys/values of a block *exactly as the model's attention sees
them* (after q/k norms and rotary embeddings), which the attention-aware statistics need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadInfo:
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (grouped-query attention); query head h uses KV head h // n_rep."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class AttentionStates:
    """Per-head attention inputs of a chunk, float32.

    ``q``: ``(B, n_heads, L, head_dim)``, ``k``/``v``: ``(B, n_kv_heads, L, head_dim)``; ``q`` and
    ``k`` are post-norm and post-RoPE, ``scaling`` is the factor the model applies to ``q k^T``.
    """
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scaling: float


def derivative(fn, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``fn'(z)`` element-wise by central differences (any activation; float32)."""
    z = z.float()
    out = fn(z + eps)
    out.sub_(fn(z - eps)).div_(2 * eps)
    return out


class GatedMLP:
    """``down(act(gate(x)) * up(x))`` (Llama, Qwen): ``m_up = act(g)``, ``m_gate = act'(g) * u``."""

    def mlp_gains(self, block: nn.Module, x: torch.Tensor) -> dict:
        gate, up = self.mlp_in
        act = self.mlp_activation(block)
        g = block.get_submodule(gate)(x).float()
        I = g.shape[-1]
        m_up = act(g).reshape(-1, I)
        m_gate = derivative(act, g)
        del g
        m_gate.mul_(block.get_submodule(up)(x).float())
        return {up: m_up, gate: m_gate.reshape(-1, I)}

    def mlp_activation(self, block: nn.Module):
        return block.get_submodule("mlp").act_fn


class ModelAdapter:
    """Base class; subclasses set the names and override what differs."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    blocks_prefix: str = ""           # e.g. "model.layers"
    q_proj = "self_attn.q_proj"
    k_proj = "self_attn.k_proj"
    v_proj = "self_attn.v_proj"
    o_proj = "self_attn.o_proj"
    mlp_in: tuple[str, ...] = ()      # layers fed by the MLP input (fc1 / gate+up)
    mlp_out: str = ""                 # fc2 / down_proj
    uses_rope = False
    has_qk_norm = False

    def __init__(self, config):
        self.config = config
        self.check_config(config)

    # ----- shapes -----------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def heads(self) -> HeadInfo:
        c = self.config
        n_heads = int(c.num_attention_heads)
        n_kv = int(getattr(c, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // n_heads)
        return HeadInfo(hidden_size=int(c.hidden_size), n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    def check_config(self, config) -> None:
        h = self.heads
        if h.n_heads % h.n_kv_heads:
            raise ValueError(f"{self.family}: {h.n_heads} attention heads do not divide into "
                             f"{h.n_kv_heads} key/value heads")

    # ----- layout -----------------------------------------------------------------
    def block_name(self, i: int) -> str:
        return f"{self.blocks_prefix}.{i}"

    #: modules applied after the last block and before the LM head, in order (absent ones skipped)
    final_modules: tuple[str, ...] = ("model.norm",)

    def head_modules(self, model: nn.Module) -> list[str]:
        out = []
        for name in self.final_modules:
            parent, child = name.rsplit(".", 1)
            if getattr(model.get_submodule(parent), child, None) is not None:
                out.append(name)
        return out

    def quant_groups(self) -> list[tuple[str, ...]]:
        """Linear layers of a block in quantization order; a group shares one input."""
        return [(self.q_proj, self.k_proj, self.v_proj), (self.o_proj,), tuple(self.mlp_in), (self.mlp_out,)]

    def linear_names(self) -> list[str]:
        return [n for g in self.quant_groups() for n in g]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out_features, in_features)`` of every quantized linear of one block."""
        h, d, inter = self.heads, self.heads.hidden_size, self.intermediate_size
        shapes = {self.q_proj: (h.n_heads * h.head_dim, d), self.k_proj: (h.n_kv_heads * h.head_dim, d),
                  self.v_proj: (h.n_kv_heads * h.head_dim, d), self.o_proj: (d, h.n_heads * h.head_dim)}
        for n in self.mlp_in:
            shapes[n] = (inter, d)
        shapes[self.mlp_out] = (d, inter)
        return shapes

    # ----- MLP --------------------------------------------------------------------
    def mlp_gains(self, block: nn.Module, x: torch.Tensor) -> dict:
        """Per MLP-input layer, the per-token factor ``m`` (``(tokens, I)``, float32) with which an
        error ``dz`` of that layer's output reaches the MLP-output layer's input: ``dh ~ m * dz``.
        ``x`` is the MLP input. Ungated MLP (``fc1 -> act``): ``m = act'(z)``."""
        z = block.get_submodule(self.mlp_in[0])(x).float()
        return {self.mlp_in[0]: derivative(self.mlp_activation(block), z).reshape(-1, z.shape[-1])}

    def mlp_activation(self, block: nn.Module):
        return block.activation_fn

    # ----- attention --------------------------------------------------------------
    def attention(self, block: nn.Module) -> nn.Module:
        return block.get_submodule("self_attn")

    def attention_states(self, block: nn.Module, x: torch.Tensor, block_kwargs: dict) -> AttentionStates:
        """Queries/keys/values of the block's attention for its input ``x`` (``(B, L, d)``)."""
        raise NotImplementedError

    def rope_cos_sin(self, block_kwargs: dict, seqlen: int):
        """``(cos, sin)`` of shape ``(L, head_dim)`` as the model applies them, or None."""
        return None

    def qk_norm_weights(self, block: nn.Module):
        """Per-dimension weights of the q/k norms (``(head_dim,)`` each) or ``(None, None)``."""
        return None, None

    def _split_heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        B, L, _ = t.shape
        return t.reshape(B, L, n, self.heads.head_dim).transpose(1, 2)
