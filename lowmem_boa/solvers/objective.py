"""The quadratic objectives the solvers minimise (evaluated with undamped Hessians)."""

from __future__ import annotations

import torch


def layer_loss(W: torch.Tensor, Q: torch.Tensor, H_col: torch.Tensor,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """GPTQ's layer-wise error ``tr(dW H_col dW^T)`` with ``dW = Q - W``, computed in ``dtype``.

    ``H_col`` may be ``(C, C)`` or per head ``(n_heads, C, C)`` (rows split evenly into heads).
    """
    D = (Q - W).to(dtype)
    H = H_col.to(dtype)
    if H.dim() == 3:
        D = D.reshape(H.shape[0], -1, D.shape[-1])
    return ((D @ H) * D).sum()


def attention_loss(W: torch.Tensor, Q: torch.Tensor, H_col: torch.Tensor, H_row: torch.Tensor,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """BoA's attention-aware error ``sum_h tr(H_row,h dW_h H_col,h dW_h^T)``, computed in ``dtype``.

    Equals ``vec(dW_h)^T (H_col,h (x) H_row,h) vec(dW_h)`` summed over heads (column-major vec).
    """
    n_heads = H_row.shape[0]
    D = (Q - W).to(dtype).reshape(n_heads, -1, W.shape[-1])
    H = H_col.to(dtype)
    return (H_row.to(dtype) * (D @ H @ D.transpose(-1, -2))).sum()
