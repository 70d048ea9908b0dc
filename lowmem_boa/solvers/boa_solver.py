"""BoA: Kronecker Hessians ``H_col,h (x) H_row,h`` per head, head-wise simultaneous quantization.

Algorithm 1 of the paper with the refined row update of Appendix B:

for ``j = 0 .. head_dim - 1``
  * stack the ``j``-th row of every head into ``W^(j)`` (``n_heads x d_col``) and quantize it
    with OPTQ over the columns, each head with its own ``U_col,h`` (one batched sweep);
  * with the scaled errors ``E_h`` of that sweep, update the remaining rows of every head:
    ``W_h[i, :] -= U_row,h[j, i] / U_row,h[j, j] * (E_h @ U_col,h)`` for ``i > j``
    (one batched matmul over heads).

Row ``j`` of the update (``i = j``) is exactly the sum of the column updates OPTQ already
applied inside the sweep, which is why only ``i > j`` is touched. The tests check this whole
procedure against sequential OBS with the full ``(d_col*head_dim)^2`` Kronecker Hessian.

Joint rows (``joint_rows=N``, TurboBoA's first change): rows ``j .. j+N-1`` of every head are
swept together (each on its own over the columns) and the rows after them move by the
closed-form minimiser of the Kronecker objective with the block fixed,
``W_R -= [U^T]_{R,B} ([U^T]_{B,B})^{-1} (W_B - Q_B)`` -- one ``N x N`` triangular solve per block
instead of ``N`` sequential row steps (``head_dim / N`` sweeps per projection).
"""

from __future__ import annotations

import torch

from .grid import expand_params, find_params
from .hessian import gather_last, inverse_perm
from .optq import optq_sweep
from .kquant import ktype
from .prepare import (Prepared, finalize, group_params_fn, kquant_fields, kquant_group_params, kquant_result,
                      prepare)
from .refine import refine_result
from .result import QuantResult
from .validation import (check_bits, check_col_hessian, check_grid, check_group_size, check_heads,
                         check_percdamp, check_positive_int, check_row_hessian, check_sym,
                         check_weight, compute_dtype)


def validate_boa_args(W, H_col, H_row, n_heads, bits, sym, grid, group_size, block_size, percdamp):
    W = check_weight(W)
    n_heads, head_dim = check_heads(W, n_heads)
    check_col_hessian(H_col, W.shape[1], n_heads)
    check_row_hessian(H_row, n_heads, head_dim)
    return (W, n_heads, check_bits(bits), check_sym(sym), check_grid(grid),
            check_group_size(group_size, W.shape[1]), check_positive_int("block_size", block_size),
            check_percdamp(percdamp))


def _row_views(prep: Prepared, j: int, n: int = 1):
    """Rows ``j .. j+n-1`` of all heads as a batch for the sweep, plus their grids."""
    W3 = prep.W3
    nh, _, C = W3.shape
    if prep.shared_col:  # one U_col: the heads are just rows of one OPTQ problem
        if n == 1:
            Wj = W3[:, j, :].unsqueeze(0)                               # (1, nh, C)
            pick = (lambda t: t[:, j, :].unsqueeze(0))
        else:
            Wj = W3[:, j:j + n, :].reshape(1, nh * n, C)                 # (1, nh*n, C), head-major
            pick = (lambda t: t[:, j:j + n, :].reshape(1, nh * n, t.shape[-1]))
    else:                # one U_col per head: batch over heads
        Wj = W3[:, j:j + n, :]                                          # (nh, n, C)
        pick = (lambda t: t[:, j:j + n, :])
    scale = pick(prep.scale) if prep.scale is not None else None
    zero = pick(prep.zero) if prep.zero is not None else None
    return Wj, scale, zero


def joint_row_coefficients(U_row: torch.Tensor, j: int, n: int) -> torch.Tensor:
    """``[U^T]_{R,B} ([U^T]_{B,B})^{-1}`` (``(nh, dh-j-n, n)``) for the row block ``B = j..j+n-1``
    and the rows after it ``R``: fixing ``B`` at ``Q_B``, the minimiser of the Kronecker
    objective over ``R`` moves ``W_R`` by ``-coef (W_B - Q_B)`` (``U^T U = H_row^{-1}``, ``U`` upper;
    derivation in docs/design.md). ``n = 1``: ``U[j, j+1:] / U[j, j]``, Appendix B's update."""
    L_BB = U_row[:, j:j + n, j:j + n].transpose(-1, -2)                 # lower triangular
    L_RB = U_row[:, j:j + n, j + n:].transpose(-1, -2)                  # (nh, |R|, n)
    return torch.linalg.solve_triangular(L_BB, L_RB, upper=False, left=False)


def _follow_grid(prep: Prepared, j: int, bits, sym, grid, group_size, grid_kwargs, n: int = 1) -> None:
    """Search the grids of rows ``j .. j+n-1`` (every head) on their current weights, in the original
    column order (static groups are defined there), and write them where the sweep reads them."""
    Wrow = prep.W3[:, j:j + n, :]
    if prep.perm_col is not None:
        Wrow = gather_last(Wrow, inverse_perm(prep.perm_col))
    s_j, z_j = find_params(Wrow, bits, sym, grid, H=prep.H_col_fit if grid == "hessian" else None,
                           group_size=group_size, **grid_kwargs)
    prep.row_scale[:, j:j + n], prep.row_zero[:, j:j + n] = s_j, z_j
    if group_size is not None:   # per column, in processing order
        C = prep.W3.shape[-1]
        sc, zc = expand_params(s_j, group_size, C), expand_params(z_j, group_size, C)
        if prep.perm_col is not None:
            sc, zc = gather_last(sc, prep.perm_col), gather_last(zc, prep.perm_col)
        prep.scale[:, j:j + n], prep.zero[:, j:j + n] = sc, zc


def boa_quantize(W: torch.Tensor, H_col: torch.Tensor, H_row: torch.Tensor, n_heads: int, bits: int,
                 sym: bool = False, grid: str = "hessian", act_order_col: bool = False,
                 act_order_row: bool = False, percdamp: float = 0.01, group_size: int | None = None,
                 block_size: int = 128, overwrite_hessians: bool = False, follow_grids: bool = False,
                 refine_sweeps: int = 0, joint_rows: int = 1, kquant: str | None = None,
                 **grid_kwargs) -> QuantResult:
    """BoA on one projection; returns codes and grids too (see :class:`QuantResult`).

    ``W`` is ``(n_heads * head_dim, d_col)`` with head ``h`` owning rows
    ``h*head_dim:(h+1)*head_dim``; ``H_col`` is ``(d_col, d_col)`` or ``(n_heads, d_col, d_col)``;
    ``H_row`` is ``(n_heads, head_dim, head_dim)``. For grouped-query attention pass the
    number of KV heads for K/V projections: heads are read from the shapes only.
    ``overwrite_hessians=True``: ``H_col``/``H_row`` may be modified in place (saves a copy).
    ``follow_grids=True``: a row's grid (per channel, or static groups under column act-order)
    is searched right before the row is swept, on the row as the earlier rows' updates left it,
    instead of up front on the original weights (dynamic groups always follow the weights).
    ``refine_sweeps``: coordinate-descent sweeps of scale refinement once every code is fixed
    (``solvers.refine``; 0 = none).
    ``joint_rows=N``: the rows of each head are quantized N at a time (each swept over the columns
    on its own, as GPTQ sweeps rows) and the rows after them get the closed-form update of the
    whole block (:func:`joint_row_coefficients`); ``N = 1`` is Algorithm 1 exactly.
    ``kquant`` (``"q2_k"`` ... ``"q6_k"``): every row onto llama.cpp's k-quant grid, each super-block's
    grid searched when the row's sweep reaches it (``solvers.kquant``; as ``gptq_kquant``).
    """
    kt = None
    if kquant is not None:
        if act_order_col or group_size is not None or refine_sweeps:
            raise ValueError("k-quant grids take no column act-order, --group-size or scale refinement: the "
                             "type fixes the super-blocks and their stored scales")
        kt = ktype(kquant)
        bits, sym, grid, group_size = kt.bits, not kt.offset, "minmax", kt.block
        if W.shape[-1] % kt.block:
            raise ValueError(f"{kt.name} needs the input size to be a multiple of {kt.block}, got {W.shape[-1]}")
    W, n_heads, bits, sym, grid, group_size, block_size, percdamp = validate_boa_args(
        W, H_col, H_row, n_heads, bits, sym, grid, group_size, block_size, percdamp)
    joint_rows = check_positive_int("joint_rows", joint_rows)
    if kt is not None:
        group_size = kt.block    # (validation reads a group as wide as the row as "per channel")
    dtype = compute_dtype(W, H_col, H_row)
    if kt is not None:   # diag(H_col) per head (block_v's V) or shared, before prepare damps it
        imp = torch.diagonal(H_col, dim1=-2, dim2=-1).to(dtype=dtype, copy=True)
        imp = imp.unsqueeze(-2) if imp.dim() == 2 else imp
    prep = prepare(W, H_col, H_row, n_heads, bits, sym, grid, group_size, bool(act_order_col),
                   bool(act_order_row), percdamp, dtype, grid_kwargs, overwrite_hessians)
    nh, dh, C = prep.W3.shape
    if kt is not None:
        gp, kgrids = kquant_group_params(kt, imp)
    else:
        gp = group_params_fn(prep, bits, sym, grid, grid_kwargs) if prep.dynamic_groups else None
    Q3 = torch.empty_like(prep.W3)
    codes3 = torch.empty_like(prep.W3)
    g_scale, g_zero = [], []
    U_row = prep.U_row
    follow = follow_grids and not prep.dynamic_groups
    for j in range(0, dh, joint_rows):
        n = min(joint_rows, dh - j)
        if follow and j > 0:   # the first rows have seen no update: their up-front grids are the same
            _follow_grid(prep, j, bits, sym, grid, group_size, grid_kwargs, n)
        Wj, scale, zero = _row_views(prep, j, n)
        res = optq_sweep(Wj, prep.U_col, prep.maxq, block_size, scale, zero, group_size, gp,
                         offset=kt is not None and kt.offset)
        Q3[:, j:j + n, :] = res.Q.reshape(nh, n, C)
        codes3[:, j:j + n, :] = res.codes.reshape(nh, n, C)
        if gp is not None:
            g_scale.append(res.group_scale.reshape(nh, n, -1))
            g_zero.append(res.group_zero.reshape(nh, n, -1))
        if j + n < dh:
            delta = (res.E @ prep.U_col).reshape(nh, n, C)               # E_h U_col,h = W_B - Q_B
            if n == 1:
                # Appendix B: W_h[j+1:, :] -= U_row^T[j+1:, j] (E_h U_col,h) / U_row[j, j]
                coef = (U_row[:, j, j + 1:] / U_row[:, j, j:j + 1]).unsqueeze(-1)  # (nh, dh-j-1, 1)
            else:
                coef = joint_row_coefficients(U_row, j, n)
            prep.W3[:, j + n:, :].baddbmm_(coef, delta, alpha=-1)
    if kt is not None:
        return kquant_result(kt, Q3, codes3, torch.cat(g_scale, dim=1), torch.cat(g_zero, dim=1),
                             kquant_fields(kgrids, C // kt.block, (nh, dh)), W, prep, "boa")
    if gp is not None:
        row_scale, row_zero = torch.cat(g_scale, dim=1), torch.cat(g_zero, dim=1)
    else:
        row_scale, row_zero = prep.row_scale, prep.row_zero
    res = finalize(prep, Q3, codes3, row_scale, row_zero, W, bits, sym, "boa")
    if follow:
        res.info["follow_grids"] = True
    return refine_result(prep, res, W, refine_sweeps)


def boa(W: torch.Tensor, H_col: torch.Tensor, H_row: torch.Tensor, n_heads: int, bits: int,
        sym: bool = False, grid: str = "hessian", act_order_col: bool = False,
        act_order_row: bool = False, percdamp: float = 0.01, **kwargs) -> torch.Tensor:
    """De-quantized BoA weights, same shape/dtype as ``W``."""
    return boa_quantize(W, H_col, H_row, n_heads, bits, sym=sym, grid=grid,
                        act_order_col=act_order_col, act_order_row=act_order_row,
                        percdamp=percdamp, **kwargs).Q
