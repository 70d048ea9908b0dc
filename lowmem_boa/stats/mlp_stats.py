"""Row Hessians of the MLP-input layers (``--mlp-row-hessian``), the MLP's analogue of BoA's V.

BoA gives V the row Hessian ``W_out,h^T W_out,h``: an error in V's output reaches the block
through the out-projection, so errors of different rows can cancel there. The MLP-input layers
(``fc1``; ``gate``/``up``) feed the MLP-output layer the same way, through an element-wise factor
per token: ``dh_t = m_t * dz_t`` (``m = act'(z)`` for ``fc1``; ``m = act(g)`` for ``up``;
``m = act'(g) * u`` for ``gate``; see ``ModelAdapter.mlp_gains``). For one token the error at the
MLP output is exactly

    ||W_out (m_t * dW x_t)||^2 = tr(dW x_t x_t^T dW^T H_t),   H_t = (W_out^T W_out) * (m_t m_t^T),

and, relaxed like the paper's eq. 15/16 (token factors averaged independently), the layer's
Kronecker objective is ``H_col = E[x x^T]`` with ``H_row = (W_out^T W_out) * E[m m^T]``.

``I`` rows solved as one head would need ``I`` sequential sweeps; the rows are split into groups
of ``g`` consecutive rows ("heads" of the BoA solver) and the row Hessian kept block-diagonal,
which costs ``g`` sweeps like an attention projection with head size ``g``.

``residual_token_weights``: the per-token weights of the MLP-output layer's statistics under
``--residual-weights`` (its error as the next block's RMSNorm passes it on).
"""

from __future__ import annotations

import torch


def mlp_row_group(I: int, max_group: int) -> int:
    """Rows per group: the largest divisor of ``I`` not above ``max_group`` (``I`` itself if smaller)."""
    if max_group >= I:
        return I
    return next(g for g in range(max(1, max_group), 0, -1) if I % g == 0)


def gain_grams(m: torch.Tensor, group: int) -> torch.Tensor:
    """``sum_t m_t m_t^T`` restricted to its diagonal blocks of ``group`` rows: ``(I / g, g, g)``, float32
    (float64 stays float64).
    ``m`` is ``(tokens, I)``."""
    T, I = m.shape
    mg = m.to(torch.promote_types(m.dtype, torch.float32)).reshape(T, I // group, group).transpose(0, 1)  # (G, T, g)
    return mg.transpose(1, 2) @ mg


def mlp_row_hessian(S: torch.Tensor, W_out: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """``(W_out^T W_out) * E[m m^T]`` on the diagonal blocks: ``S`` is ``(G, g, g)`` (``gain_grams``
    divided by the tokens), ``W_out`` the MLP-output weight ``(d, I)``. Returns ``(G, g, g)`` float32.
    ``damp`` adds ``damp * mean(diag)`` of each group to its diagonal (``--mlp-row-damp``): a prior
    towards independent rows (GPTQ's row objective, up to scale) where the gains seen in
    calibration may not hold on other text."""
    G, g, _ = S.shape
    Wg = W_out.to(torch.promote_types(S.dtype, torch.float32)).reshape(W_out.shape[0], G, g).transpose(0, 1)
    H = (Wg.transpose(1, 2) @ Wg).to(S.device) * S                # (G, g, g)
    if damp:
        diag = H.diagonal(dim1=1, dim2=2)
        diag += damp * diag.mean(dim=1, keepdim=True)
    return H


def residual_token_weights(out: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``--residual-weights``: one weight per token, ``1 / mean(h_t^2)`` of the block output ``out``
    (``(..., d)`` -> ``(...)``, float32). An error ``e_t`` the MLP-output layer adds to the residual stream
    reaches the next block through its RMSNorm as ``e_t / rms(h_t)`` (to first order), so
    ``sum_t w_t ||e_t||^2`` is the error the next block sees. Without it a token with a massive activation
    (an attention sink: 99 % of ``H_col``'s trace in SmolLM2's block 11, docs/results.md) decides the layer
    alone."""
    return 1.0 / out.float().pow(2).mean(-1).clamp_min(eps)
