"""Random quantization problems with realistic structure, shared by the solver tests."""

from __future__ import annotations

import torch


def random_problem(seed: int, d_col: int = 32, n_heads: int = 4, head_dim: int = 8,
                   n_tokens: int = 512, per_head_col: bool = False, n_q_per_kv: int = 1,
                   dtype=torch.float64):
    """W, H_col = X X^T (outlier channels), H_row = K_h^T K_h from a random key projection.

    With ``n_q_per_kv > 1`` the row Hessian of each (KV) head sums the statistics of
    ``n_q_per_kv`` query heads, as for K/V projections under grouped-query attention.
    With ``per_head_col`` the column Hessian is ``X A_h^T A_h X^T`` with a random
    attention-like mixing ``A_h`` per head (as for V with ``block_v``).
    """
    g = torch.Generator().manual_seed(seed)
    ch_scale = torch.exp(torch.randn(d_col, 1, generator=g, dtype=dtype))  # outlier channels
    mix = torch.randn(d_col, d_col, generator=g, dtype=dtype) / d_col ** 0.5
    X = (torch.eye(d_col, dtype=dtype) + 0.5 * mix) @ (ch_scale * torch.randn(d_col, n_tokens, generator=g, dtype=dtype))
    W = torch.randn(n_heads * head_dim, d_col, generator=g, dtype=dtype) / d_col ** 0.5
    if per_head_col:
        Hs = []
        for _ in range(n_heads):
            logits = torch.randn(n_tokens, n_tokens, generator=g, dtype=dtype) * 2
            A = torch.softmax(logits, dim=-1)
            XA = X @ A.T
            Hs.append(XA @ XA.T)
        H_col = torch.stack(Hs)
    else:
        H_col = X @ X.T
    Wk = torch.randn(n_heads * n_q_per_kv * head_dim, d_col, generator=g, dtype=dtype) / d_col ** 0.5
    K = (Wk @ X).reshape(n_heads, n_q_per_kv, head_dim, n_tokens)
    H_row = torch.einsum("hqin,hqjn->hij", K, K)
    return W, H_col, H_row


def fake_quant(w, s, z, maxq):
    return s * (torch.clamp(torch.round(w / s) + z, 0, maxq) - z)
