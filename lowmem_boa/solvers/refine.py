"""Scale refinement: with every integer code fixed, move each grid's scale to lower the layer objective.

After GPTQ or BoA has chosen the codes ``c`` of a layer, its de-quantized weights are
``Q = s * (c - z)`` per row and group. With ``u = c - z`` fixed, the layer objective

    f(s) = sum_h tr(H_row,h E_h H_col,h E_h^T),   E = W - Q(s)     (H_row = I for GPTQ)

is a convex quadratic in the scales. This module minimises it by exact block coordinate
descent, one row at a time (all heads of a row index batched), each row's ``G`` group scales
jointly. For row ``j`` of head ``h`` let ``U_j`` be the ``G x C`` matrix whose row ``g`` is
``u_j`` restricted to group ``g``. Moving row ``j``'s scales by ``d`` changes ``E_j`` by
``-d^T U_j``, and the minimiser over ``d`` with every other row fixed is

    (H_row[j, j] * U_j H_col U_j^T) d = U_j H_col (sum_i H_row[i, j] E_i)^T ,

a ``G x G`` system (a scalar per row for per-channel grids). No step increases ``f`` (each is
the exact minimiser of a convex quadratic along its block, or a shortened step towards it
when the full step would make a scale non-positive, which cannot increase ``f`` either).
Without a row Hessian the rows do not interact, so one sweep is the global optimum; with one,
sweeps converge to it. A group whose codes all equal its zero point (``u = 0``) does not enter
``Q`` and keeps its scale. The solver refines with the same (damped) Hessians it solved with.

TurboBoA (arXiv 2602.04929) refines per-channel scales after quantization in the same spirit;
this derivation also covers groups (a joint ``G x G`` solve per row) and per-head ``H_col``.
"""

from __future__ import annotations

import torch

from .grid import _group_view, dequantize, expand_params

#: rows of a row-independent problem handled at once (bounds the ``rows x G x C`` workspace)
ROW_CHUNK = 512


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``(..., C) -> (..., G, g)`` zero-padded; per-channel: ``G = 1`` (the grid search's view)."""
    return _group_view(x, group_size)[0]


def _gram_blocks(Ug: torch.Tensor, H: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``A[n, g, g'] = u_n^(g) H u_n^(g')^T`` for rows ``u`` (``Ug``: ``(n, G, g)``) and ``H``
    ``(C, C)`` shared or ``(n, C, C)`` per row."""
    n, G, g = Ug.shape
    C = H.shape[-1]
    pad = G * g - C
    Hp = torch.nn.functional.pad(H, (0, pad, 0, pad)) if pad else H
    if Hp.dim() == 2:
        Y = torch.einsum("ngk,gkc->ngc", Ug, Hp.reshape(G, g, G * g))          # u^(g) H, all columns
    else:
        Y = torch.einsum("ngk,ngkc->ngc", Ug, Hp.reshape(n, G, g, G * g))
    return torch.einsum("ngk,nhgk->ngh", Ug, Y.reshape(n, G, G, g))


def _row_step(Ug: torch.Tensor, V: torch.Tensor, H: torch.Tensor, hjj: torch.Tensor | None,
              scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """The scale change ``d`` (``(n, G)``) of rows with codes ``Ug`` (``(n, G, g)``) given
    ``V = sum_i H_row[i, j] E_i`` (``(n, C)``) and ``hjj = H_row[j, j]`` (``None``: 1)."""
    Z = V @ H if H.dim() == 2 else torch.bmm(V.unsqueeze(1), H).squeeze(1)
    b = (Ug * _grouped(Z, group_size)).sum(-1)                                # (n, G)
    A = _gram_blocks(Ug, H, group_size)
    if hjj is not None:
        A = A * hjj.reshape(-1, 1, 1)
    dead = torch.diagonal(A, dim1=-2, dim2=-1) <= 0                           # u = 0: scale unused
    A = A + torch.diag_embed(dead.to(A.dtype))
    b = b.masked_fill(dead, 0.0)
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info == 0).all()):
        d = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    else:   # numerically semidefinite (collinear groups): least squares
        d = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
    d = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0).masked_fill(dead, 0.0)
    # keep every scale positive: shorten the step (t in [0, 1] never increases the objective)
    limit = torch.where(d < 0, 0.5 * scale / (-d).clamp_min(torch.finfo(d.dtype).tiny),
                        torch.full_like(d, float("inf")))
    t = limit.amin(-1, keepdim=True).clamp(max=1.0)
    return d * t


def refine_scales(W: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  group_size: int | None, H_col: torch.Tensor, H_row: torch.Tensor | None = None,
                  sweeps: int = 1) -> torch.Tensor:
    """Refined scales ``(R, G)`` for fixed ``codes``/``zero`` (see the module docstring).

    ``W`` ``(R, C)``: the weights the solver fitted; ``codes`` ``(R, C)``; ``scale``/``zero``
    ``(R, G)``. ``H_col`` ``(C, C)`` or per head ``(nh, C, C)``; ``H_row`` ``(nh, dh, dh)`` or
    ``None`` (GPTQ: rows independent). Head ``h`` owns rows ``h*dh:(h+1)*dh``. Computed in the
    dtype of ``scale`` promoted to float32 at least; ``sweeps=0`` returns ``scale`` unchanged.
    """
    f = torch.promote_types(scale.dtype, torch.float32)
    R, C = W.shape
    s = scale.to(f).clone()
    if sweeps <= 0:
        return s
    U = codes.to(f) - expand_params(zero.to(f), group_size, C)
    E = W.to(f) - expand_params(s, group_size, C) * U
    Hc = H_col.to(f)
    if H_row is None and Hc.dim() == 2:     # rows independent: one exact step per row
        for r0 in range(0, R, ROW_CHUNK):
            r1 = min(r0 + ROW_CHUNK, R)
            s[r0:r1] += _row_step(_grouped(U[r0:r1], group_size), E[r0:r1], Hc, None, s[r0:r1], group_size)
        return s
    nh = H_row.shape[0] if H_row is not None else Hc.shape[0]
    dh = R // nh
    Hr = None if H_row is None else H_row.to(f)
    U3, E3, s3 = U.reshape(nh, dh, C), E.reshape(nh, dh, C), s.reshape(nh, dh, -1)
    for _ in range(sweeps if Hr is not None else 1):
        P = E3 if Hr is None else Hr @ E3                   # P[:, j] = sum_i H_row[i, j] E_i (symmetric H_row)
        for j in range(dh):
            Ug = _grouped(U3[:, j], group_size)
            d = _row_step(Ug, P[:, j], Hc, None if Hr is None else Hr[:, j, j], s3[:, j], group_size)
            s3[:, j] += d
            dE = -expand_params(d, group_size, C) * U3[:, j]   # (nh, C)
            E3[:, j] += dE
            if Hr is not None:                              # (without H_row, P is E3 itself)
                P += Hr[:, :, j:j + 1] * dE.unsqueeze(1)
    return s3.reshape(R, -1)


def refine_result(prep, res, W: torch.Tensor, sweeps: int):
    """Refine the scales of a solver's :class:`QuantResult` in place (``res.scale``, ``res.Q``)
    against the weights it fitted (``W`` with dead input columns zeroed, as the solver saw
    them) and the damped Hessians it solved with (``prep.H_col_fit``, ``prep.H_row_fit``)."""
    if sweeps <= 0:
        return res
    Hc = prep.H_col_fit
    W_fit = W.to(torch.promote_types(W.dtype, torch.float32))
    if bool(prep.dead.any()):
        keep = (~prep.dead).to(W_fit.dtype)                                  # (Bc, C)
        W_fit = (W_fit.reshape(keep.shape[0], -1, W.shape[1]) * keep.unsqueeze(1)).reshape(W.shape)
    H_col = Hc[0] if Hc.shape[0] == 1 else Hc
    res.scale = refine_scales(W_fit, res.codes, res.scale, res.zero, res.group_size, H_col, prep.H_row_fit,
                              sweeps).to(res.scale.dtype)
    res.Q = dequantize(res.codes, res.scale, res.zero, res.group_size, dtype=res.Q.dtype)
    res.info["refine_sweeps"] = int(sweeps)
    return res
