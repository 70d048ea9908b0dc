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

**A bounded second candidate** (``max_shift``). The correction is a regression of the fp output on
the perturbed input. Where the two streams have drifted apart (``||X - X~||`` comparable to ``||X||``)
the fp output is not reachable from ``X~``, and ``(H + lam I)^{-1}`` amplifies the weak directions of
``H``: ``W'`` can come out several times the size of ``W`` (SmolLM2, 2 bits: 1.5-2.8x in block 11's
MLP-output layer, where the model makes its attention sink). With a healthy stream ``||W' - W|| ~
alpha ||W|| ||X - X~|| / ||X||`` stays below ``alpha ||W||``. ``max_shift = m`` returns the weight with
``alpha`` scaled down so that ``||W' - W||_F <= m ||W||_F`` (``alpha_applied = alpha * min(1, m ||W|| /
(alpha ||Z||))``): again ``W'(alpha_applied)``, the minimiser of the same weighted objective with a
smaller weight on the fp term. The block solver uses it as a second candidate, never blindly
(``block.BlockQuantizer.solve``): a wild target is sometimes what the model needs (the sink token's
output) and sometimes beyond what the grid can follow.
"""

from __future__ import annotations

import torch


def _correction(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, percdamp: float, f: torch.dtype) -> torch.Tensor:
    """``W (C - H) (H + lam I)^{-1}`` in ``f``, as ``(D, R)`` (its transpose)."""
    Hd = H.to(f).clone()
    diag = torch.diagonal(Hd)
    diag[diag == 0] = 1.0
    diag.add_(percdamp * diag.mean())
    D = C.to(f) - H.to(f)
    rhs = (W.to(f) @ D).T                       # (D, R): solve Hd^T Z = (W D)^T, Hd symmetric
    L, failed = torch.linalg.cholesky_ex(Hd)
    if int(failed) == 0:
        return torch.cholesky_solve(rhs, L)
    return torch.linalg.lstsq(Hd, rhs).solution   # not positive definite in float32: least squares


def fp_target_weight(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, percdamp: float = 0.01,
                     alpha: float = 1.0, max_shift: float | None = None, info: dict | None = None) -> torch.Tensor:
    """``W + alpha W (C - H) (H + lam I)^{-1}`` in float32 (or float64) (``W``: ``(R, D)``; ``H``, ``C``: ``(D, D)``).

    ``H`` and ``C`` are not modified. Dead input channels (zero diagonal of ``H``) get a unit
    diagonal as in the solvers; their column of ``C - H`` is zero, so they keep ``W``'s column.
    Per head (``H``, ``C``: ``(n, D, D)``, V under block_v with ``--block-v-targets``): ``W``'s rows are
    ``n`` equal heads, head ``j`` corrected with ``H[j]``, ``C[j]`` (each head's own objective).
    ``max_shift``: if given, ``alpha`` is scaled down so that ``||W' - W||_F <= max_shift ||W||_F``
    (module docstring; one ``alpha`` for all heads). ``info``, if given, receives ``fp_shift``
    (``||alpha Z|| / ||W||`` before the bound) and ``fp_alpha_applied``. Returns the corrected weight
    in ``W``'s dtype.
    """
    f = torch.promote_types(W.dtype, torch.float32)     # float32 (float64 stays float64)
    if H.dim() == 2:
        Z = _correction(W, H, C, percdamp, f)
    else:
        n = H.shape[0]
        if W.shape[0] % n or C.shape != H.shape:
            raise ValueError(f"per-head fp targets: {W.shape[0]} rows in {n} heads, C {tuple(C.shape)} "
                             f"for H {tuple(H.shape)}")
        r = W.shape[0] // n
        Z = torch.cat([_correction(W[j * r:(j + 1) * r], H[j], C[j], percdamp, f) for j in range(n)], dim=1)
    Wf = W.to(f)
    w_norm = float(torch.linalg.matrix_norm(Wf))
    shift = alpha * float(torch.linalg.matrix_norm(Z)) / w_norm if w_norm > 0 else 0.0
    applied = alpha
    if max_shift is not None and shift > max_shift:
        applied = alpha * max_shift / shift
    if info is not None:
        info["fp_shift"] = shift
        info["fp_alpha_applied"] = applied
    return (Wf + applied * Z.T).to(W.dtype)
