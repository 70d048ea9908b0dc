"""Full-precision targets for a layer whose input is already perturbed (asymmetric calibration).

A layer of the quantized model sees the input ``X~`` produced by the quantized layers before it,
while the full-precision model feeds the same layer ``X``. GPTQ and BoA minimise
``||(Q - W) X~||`` — they reproduce the fp *layer* on the perturbed input. Fitting the fp *model*
instead means minimising ``||Q X~ - W X||`` (GPTAQ's asymmetric calibration). With
``H = X~ X~^T`` and ``C = X X~^T`` (both means over tokens):

    ||Q X~ - W X||^2 = tr((Q - W') H (Q - W')^T) + const,   W' = W C H^{-1},

so any solver of the symmetric objective, run on the corrected weight ``W'`` with the same
``H``, minimises the asymmetric one — also under a row Hessian (BoA's Kronecker objective
``tr(H_row (Q X~ - W X)(Q X~ - W X)^T)`` has the same minimiser shift). With damping
``lam * I`` (``lam = percdamp * mean diag(H)``, as the solvers damp ``H``) the ridge solution is
taken towards the original weight rather than towards 0:

    W' = argmin ||Q X~ - W X||^2 + lam ||Q - W||^2 = W + W (C - H) (H + lam I)^{-1},

which is exactly ``W`` when the input is unperturbed (``C = H``).

GPTAQ and TurboBoA scale the correction by ``alpha`` (0.25 by default there): the target moves
``alpha`` of the way from the layer's own output on the perturbed input (``alpha = 0``: plain
GPTQ/BoA) to the fp model's (``alpha = 1``). With ``R = C - H = (X - X~) X~^T`` this is

    W'(alpha) = W + alpha W R (H + lam I)^{-1},

the minimiser of ``alpha ||Q X~ - W X||^2 + (1 - alpha) ||(Q - W) X~||^2 + lam ||Q - W||^2``
(the two objectives share ``H``, so their weighted sum is again ``tr((Q - W') H (Q - W')^T)``).

**A bound on the correction** (``max_shift``). The correction is a regression of the fp output on the
perturbed input. Where the two streams have drifted apart (``||X - X~||`` comparable to ``||X||``) the
fp output is not reachable from ``X~``, and ``(H + lam I)^{-1}`` amplifies the weak directions of ``H``:
``W'`` can come out several times the size of ``W`` (SmolLM2, 2 bits: 2.2-2.8x in block 11's
MLP-output layer, where the model makes its attention sink), and the solver then quantizes a wild
target on a grid stretched to its range. With a healthy stream ``||W' - W|| ~ alpha ||W|| ||X - X~|| /
||X||`` stays below ``alpha ||W||``. ``max_shift = m`` solves the same weighted objective over the
trust region ``||W' - W||_F <= m ||W||_F``: with ``Delta = W' - W`` the objective is
``tr(Delta (H + lam I) Delta^T) - 2 alpha tr(Delta R^T W^T) + const``, and its constrained minimiser
(KKT) is the ridge solution with a larger damping,

    Delta(nu) = alpha W R (H + (lam + nu) I)^{-1},   nu >= 0 the smallest with ||Delta(nu)|| <= m ||W||,

found on the eigenvalues of ``H + lam I`` (``||Delta(nu)||`` falls monotonically in ``nu``). Unlike a
smaller alpha it keeps the correction along ``H``'s strong directions (the tokens that own the
layer's input energy) and cuts it along the weak ones, where the regression extrapolates.
"""

from __future__ import annotations

import torch


def fp_target_weight(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, percdamp: float = 0.01,
                     alpha: float = 1.0, max_shift: float | None = None, info: dict | None = None) -> torch.Tensor:
    """``W + alpha W (C - H) (H + lam I)^{-1}`` in float32 (or float64) (``W``: ``(R, D)``; ``H``, ``C``: ``(D, D)``).

    ``H`` and ``C`` are not modified. Dead input channels (zero diagonal of ``H``) get a unit
    diagonal as in the solvers; their column of ``C - H`` is zero, so they keep ``W``'s column.
    ``max_shift``: if given, the minimiser over ``||W' - W||_F <= max_shift ||W||_F`` (module docstring).
    ``info``, if given, receives ``fp_shift`` (``||W' - W|| / ||W||`` without the bound), ``fp_ridge``
    (the bound's extra damping ``nu`` as a fraction of ``mean diag H``; 0 where the bound is not hit)
    and ``fp_shift_applied``. Returns the corrected weight in ``W``'s dtype.
    """
    f = torch.promote_types(W.dtype, torch.float32)     # float32 (float64 stays float64)
    Hd = H.to(f).clone()
    diag = torch.diagonal(Hd)
    diag[diag == 0] = 1.0
    mean_diag = float(diag.mean())
    diag.add_(percdamp * mean_diag)
    D = C.to(f) - H.to(f)
    rhs = (W.to(f) @ D).T                       # (D, R): solve Hd^T Z = (W D)^T, Hd symmetric
    L, failed = torch.linalg.cholesky_ex(Hd)
    if int(failed) == 0:
        Z = torch.cholesky_solve(rhs, L)
    else:                                         # not positive definite in float32: least squares
        Z = torch.linalg.lstsq(Hd, rhs).solution
    Wf = W.to(f)
    w_norm = float(torch.linalg.matrix_norm(Wf))
    shift = alpha * float(torch.linalg.matrix_norm(Z)) / w_norm if w_norm > 0 else 0.0
    nu = 0.0
    if max_shift is not None and shift > max_shift:
        delta_t, nu = _trust_region(Hd, alpha * rhs, max_shift * w_norm)
        out = Wf + delta_t.T
    else:
        out = Wf + alpha * Z.T
    if info is not None:
        info["fp_shift"] = shift
        info["fp_ridge"] = nu / mean_diag
        info["fp_shift_applied"] = min(shift, max_shift) if max_shift is not None else shift
    return out.to(W.dtype)


def _trust_region(Hd: torch.Tensor, rhs: torch.Tensor, radius: float) -> tuple[torch.Tensor, float]:
    """``(Hd + nu I)^{-1} rhs`` (``(D, R)``) with the smallest ``nu >= 0`` whose result has Frobenius norm
    ``<= radius``, and ``nu``: bisection on the eigenvalues of the symmetric positive (semi)definite ``Hd``,
    in float64 (one ``D x D`` eigendecomposition; only layers whose correction exceeds the bound pay it)."""
    e, V = torch.linalg.eigh(Hd.double())
    e = e.clamp_min(0.0)
    P = V.T @ rhs.double()                      # the right-hand side in H's eigenbasis
    g = P.pow(2).sum(1)                         # per eigen-direction squared norm

    def norm(nu: float) -> float:
        return float((g / (e + nu).clamp_min(1e-300).pow(2)).sum().sqrt())

    lo, hi = 0.0, float(g.sum().sqrt()) / radius     # at hi the norm is <= radius (every e >= 0)
    if norm(lo) <= radius:
        hi = lo
    for _ in range(200):                        # norm(hi) <= radius < norm(lo)
        if hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm(mid) > radius else (lo, mid)
    out = V @ (P / (e + hi).clamp_min(1e-300)[:, None])
    return out.to(rhs.dtype), hi
