"""Straightforward column-by-column reference implementations (slow; for tests and benchmarks).

They share the problem set-up (:func:`prepare`: damping, grids, permutations, Cholesky
factors) with the fast solvers but none of the sweep code: no blocking, no lazy updates,
no batching over heads. Every weight is quantized on its own and every remaining weight of
its row is updated right away; BoA loops over heads one at a time.
"""

from __future__ import annotations

import torch

from .boa_solver import validate_boa_args
from .gptq_solver import validate_gptq_args
from .grid import find_params
from .prepare import Prepared, finalize, prepare
from .refine import refine_result
from .result import QuantResult
from .validation import compute_dtype


def _quantize_rows(Wr: torch.Tensor, U: torch.Tensor, prep: Prepared, scale, zero, H: torch.Tensor,
                   bits: int, sym: bool, grid: str, grid_kwargs: dict):
    """Unblocked OPTQ on the rows ``Wr`` (``(r, C)``, modified in place), one column at a time.

    ``scale``/``zero`` are the rows' grids per column (``(r, C)``) or per row (``(r, 1)``),
    or None for dynamic groups. Returns Q, codes, E and the group grids found.
    """
    r, C = Wr.shape
    maxq, gs = prep.maxq, prep.group_size
    Q, codes, E = torch.zeros_like(Wr), torch.zeros_like(Wr), torch.zeros_like(Wr)
    g_scale, g_zero = [], []
    for c in range(C):
        if scale is None:
            if c % gs == 0:
                Hg = H[c:c + gs, c:c + gs] if grid == "hessian" else None
                s, z = find_params(Wr[:, c:c + gs], bits, sym, grid, H=Hg, **grid_kwargs)
                s, z = s[:, 0], z[:, 0]
                g_scale.append(s)
                g_zero.append(z)
        else:
            k = c if scale.shape[-1] > 1 else 0
            s, z = scale[:, k], zero[:, k]
        code = torch.clamp(torch.round(Wr[:, c] / s) + z, 0, maxq)
        q = s * (code - z)
        e = (Wr[:, c] - q) / U[c, c]
        Wr[:, c + 1:] -= e[:, None] * U[c, c + 1:][None, :]
        Q[:, c], codes[:, c], E[:, c] = q, code, e
    return Q, codes, E, g_scale, g_zero


def _follow(prep: Prepared, h: int, j: int, bits, sym, grid, grid_kwargs) -> None:
    """``follow_grids``: the grid of row ``j`` of head ``h`` from its current weights (original
    column order), written into the prepared per-row and per-column grids."""
    hc = 0 if prep.shared_col else h
    w = prep.W3[h, j:j + 1]
    perm = None if prep.perm_col is None else (prep.perm_col if prep.perm_col.dim() == 1 else prep.perm_col[h])
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    H = prep.H_col_fit[hc] if grid == "hessian" else None
    s, z = find_params(w, bits, sym, grid, H=H, group_size=prep.group_size, **grid_kwargs)
    prep.row_scale[h, j], prep.row_zero[h, j] = s[0], z[0]
    if prep.group_size is not None:
        g = torch.arange(w.shape[-1]) // prep.group_size
        sc, zc = s[0, g], z[0, g]
        if perm is not None:
            sc, zc = sc[perm], zc[perm]
        prep.scale[h, j], prep.zero[h, j] = sc, zc


def _solve(prep: Prepared, bits, sym, grid, grid_kwargs, follow_grids: bool = False, joint_rows: int = 1):
    """GPTQ (no row Hessian): all rows of the single head together, column by column.
    BoA: head by head, row by row (``joint_rows`` rows together), column by column, then the row
    update; for a block of rows, the minimiser of the Kronecker objective over the later rows
    ``R`` with the block ``B`` fixed, ``W_R += H_RR^-1 H_RB (W_B - Q_B)``, from the damped row
    Hessian itself (``(U^T U)^-1``) rather than from ``U``."""
    nh, dh, C = prep.W3.shape
    Q3, codes3 = torch.zeros_like(prep.W3), torch.zeros_like(prep.W3)
    scales = torch.zeros(nh, dh, 0, dtype=prep.W3.dtype)
    zeros = torch.zeros_like(scales)
    if prep.dynamic_groups:
        G = -(-C // prep.group_size)
        scales = torch.zeros(nh, dh, G, dtype=prep.W3.dtype)
        zeros = torch.zeros_like(scales)
    rows_at_once = dh if prep.U_row is None else joint_rows
    for h in range(nh):
        hc = 0 if prep.shared_col else h
        U, H = prep.U_col[hc], prep.H_col[hc]
        for j in range(0, dh, rows_at_once):
            sl = slice(j, j + rows_at_once)
            if follow_grids and prep.U_row is not None and not prep.dynamic_groups and j > 0:
                for i in range(j, min(j + rows_at_once, dh)):
                    _follow(prep, h, i, bits, sym, grid, grid_kwargs)
            Wr = prep.W3[h, sl].clone()
            sc = prep.scale[h, sl] if prep.scale is not None else None
            zr = prep.zero[h, sl] if prep.zero is not None else None
            Q, codes, E, gs_, gz_ = _quantize_rows(Wr, U, prep, sc, zr, H, bits, sym, grid, grid_kwargs)
            Q3[h, sl], codes3[h, sl] = Q, codes
            if prep.dynamic_groups:
                scales[h, sl], zeros[h, sl] = torch.stack(gs_, -1), torch.stack(gz_, -1)
            if prep.U_row is not None and rows_at_once == 1:
                Ur = prep.U_row[h]
                total = E[0] @ U  # E_h U_col,h: the whole update OPTQ applied to row j
                for i in range(j + 1, dh):
                    prep.W3[h, i] -= (Ur[j, i] / Ur[j, j]) * total
            elif prep.U_row is not None and j + rows_at_once < dh:
                Ur = prep.U_row[h]
                Hrow = torch.linalg.inv(Ur.T @ Ur)
                rest = slice(j + rows_at_once, dh)
                D = prep.W3[h, sl] - Q                      # W_B - Q_B, the block as it was swept
                prep.W3[h, rest] += torch.linalg.solve(Hrow[rest, rest], Hrow[rest, sl]) @ D
    if not prep.dynamic_groups:
        scales, zeros = prep.row_scale, prep.row_zero
    return Q3, codes3, scales, zeros


def gptq_reference(W, H_col, bits, sym=False, grid="hessian", group_size=None, act_order=False,
                   block_size=128, percdamp=0.01, refine_sweeps=0, **grid_kwargs) -> QuantResult:
    W, bits, sym, grid, group_size, block_size, percdamp = validate_gptq_args(
        W, H_col, bits, sym, grid, group_size, block_size, percdamp)
    prep = prepare(W, H_col, None, 1, bits, sym, grid, group_size, bool(act_order), False,
                   percdamp, compute_dtype(W, H_col), grid_kwargs)
    Q3, codes3, rs, rz = _solve(prep, bits, sym, grid, grid_kwargs)
    return refine_result(prep, finalize(prep, Q3, codes3, rs, rz, W, bits, sym, "gptq_reference"), W,
                         refine_sweeps)


def boa_reference(W, H_col, H_row, n_heads, bits, sym=False, grid="hessian", act_order_col=False,
                  act_order_row=False, percdamp=0.01, group_size=None, block_size=128,
                  follow_grids=False, refine_sweeps=0, joint_rows=1, **grid_kwargs) -> QuantResult:
    W, n_heads, bits, sym, grid, group_size, block_size, percdamp = validate_boa_args(
        W, H_col, H_row, n_heads, bits, sym, grid, group_size, block_size, percdamp)
    prep = prepare(W, H_col, H_row, n_heads, bits, sym, grid, group_size, bool(act_order_col),
                   bool(act_order_row), percdamp, compute_dtype(W, H_col, H_row), grid_kwargs)
    Q3, codes3, rs, rz = _solve(prep, bits, sym, grid, grid_kwargs, follow_grids, joint_rows)
    return refine_result(prep, finalize(prep, Q3, codes3, rs, rz, W, bits, sym, "boa_reference"), W,
                         refine_sweeps)
