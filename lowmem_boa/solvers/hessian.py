"""Hessian preparation shared by GPTQ and BoA.

* dead input channels (zero diagonal of ``H_col``): the diagonal entry is set to 1 and the
  matching weight column to 0, as GPTQ does (the channel never carries signal on the
  calibration data, so its weight cannot be fitted);
* damping: ``percdamp * mean(diag(H))`` is added to the diagonal (per head for batched H);
* ``upper_cholesky_of_inverse``: ``U`` upper triangular with ``U^T U = H^{-1}``
  (``U = Chol(H^{-1})^T`` in the paper's notation). If a factorisation fails, the damping
  is multiplied by 10 and retried for the failing heads only; it never falls back to RTN.
* act-order permutations by decreasing ``diag(H)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def mark_dead_channels(H: torch.Tensor, W3: torch.Tensor | None = None):
    """Fix zero diagonal entries of ``H`` (``(C, C)`` or ``(B, C, C)``) in place.

    ``W3`` is the weight viewed as ``(B or 1, rows, C)``; the columns of dead channels
    are zeroed in place (per head when ``H`` is per head). Returns the dead mask.
    """
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    if dead.any():
        diag[dead] = 1.0
        if W3 is not None:
            mask = (~dead).to(W3.dtype)
            W3.mul_(mask.unsqueeze(-2) if mask.dim() == 2 else mask)
    return dead


def add_damping(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``H += percdamp * mean(diag(H)) * I`` in place, per leading batch entry."""
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    damp = percdamp * diag.mean(-1, keepdim=True)
    diag.add_(damp)
    return damp.squeeze(-1)


@dataclass
class CholeskyInfo:
    """How much damping each head finally needed (relative to its mean diagonal)."""
    retries: int
    extra_damping: torch.Tensor  # absolute damping added on top of percdamp, per head


def upper_cholesky_of_inverse(H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 12,
                              heads_per_step: int | None = None):
    """Return ``(U, info)`` with ``U`` upper triangular and ``U^T U = H^{-1}``.

    ``H`` is ``(C, C)`` or ``(B, C, C)`` and already damped; it is *not* modified. When
    the Cholesky factorisation of ``H`` or of ``H^{-1}`` fails for a head, that head's
    diagonal is damped further by ``10**k * max(percdamp, 1e-6) * mean(diag)``.
    Heads are factorised ``heads_per_step`` at a time (default: all at once for small
    matrices, one by one from 1024 columns up) so the workspace stays ~3 C^2 per step.
    """
    batched = H.dim() == 3
    Hb = H if batched else H.unsqueeze(0)
    B, C, _ = Hb.shape
    step = heads_per_step or (B if C < 1024 else 1)
    U = torch.empty_like(Hb)
    extra = torch.zeros(B, dtype=H.dtype, device=H.device)
    retries = 0
    for b0 in range(0, B, step):
        b1 = min(b0 + step, B)
        U[b0:b1], extra[b0:b1], r = _factor_heads(Hb[b0:b1], percdamp, max_tries)
        retries = max(retries, r)
    U = U if batched else U[0]
    return U, CholeskyInfo(retries=retries, extra_damping=extra if batched else extra[:1])


def _factor_heads(Hb: torch.Tensor, percdamp: float, max_tries: int):
    B = Hb.shape[0]
    U = torch.empty_like(Hb)
    todo = torch.arange(B, device=Hb.device)
    extra = torch.zeros(B, dtype=Hb.dtype, device=Hb.device)
    base = torch.diagonal(Hb, dim1=-2, dim2=-1).mean(-1).abs().clamp_min(torch.finfo(Hb.dtype).tiny)
    step = max(percdamp, 1e-6)
    retries = 0
    for k in range(max_tries + 1):
        Hk = Hb[todo]  # a copy (advanced indexing); extra damping goes on the copy
        Hk.diagonal(dim1=-2, dim2=-1).add_(extra[todo].unsqueeze(-1))
        L, info = torch.linalg.cholesky_ex(Hk)
        del Hk
        ok = info == 0
        if ok.any():
            Hinv = torch.cholesky_inverse(L[ok])
            del L
            Uk, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            good = (info2 == 0) & torch.isfinite(Uk).flatten(1).all(1)
            idx_ok = torch.nonzero(ok).squeeze(1)
            U[todo[idx_ok[good]]] = Uk[good]
            ok[idx_ok[~good]] = False
        todo = todo[~ok]
        if todo.numel() == 0:
            break
        if k == max_tries:
            raise RuntimeError(
                f"Cholesky of the inverse Hessian failed for {todo.numel()} head(s) even after "
                f"adding {float(extra[todo].max() / base[todo].max()):.3g} x mean(diag) damping; "
                "the Hessian is not positive semi-definite")
        retries += 1
        extra[todo] += (10.0 ** k) * step * base[todo]
    return U, extra, retries


def act_order_perm(H: torch.Tensor) -> torch.Tensor:
    """Permutation(s) sorting ``diag(H)`` in decreasing order (stable); ``(..., C)``."""
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    return torch.argsort(diag, dim=-1, descending=True, stable=True)


def permute_square(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``H[..., perm, :][..., :, perm]`` with a per-batch ``perm`` of shape ``(..., C)``."""
    C = H.shape[-1]
    if perm.dim() == 1:
        return H[..., perm, :][..., :, perm]
    idx_r = perm.unsqueeze(-1).expand(*perm.shape, C)
    H = torch.gather(H, -2, idx_r)
    idx_c = perm.unsqueeze(-2).expand(*perm.shape[:-1], C, C)
    return torch.gather(H, -1, idx_c)


def gather_last(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Permute the last dim of ``x`` (``(B, R, C)``) by a shared ``(C,)`` or per-batch ``(B, C)`` perm."""
    if perm.dim() == 1:
        return x[..., perm]
    return torch.gather(x, -1, perm.unsqueeze(-2).expand(-1, x.shape[-2], -1))


def gather_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Permute dim -2 of ``x`` (``(B, R, K)``) by a per-batch ``(B, R)`` perm."""
    return torch.gather(x, -2, perm.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm, dim=-1)
