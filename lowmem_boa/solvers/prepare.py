"""Problem set-up shared by the fast solvers and the column-by-column references.

``prepare`` turns ``(W, H_col, H_row)`` into the working form of Algorithm 1:

1. ``W`` viewed per head as ``(n_heads, head_dim, d_col)`` in the compute dtype;
2. dead input channels fixed (per head for per-head ``H_col``), ``H_col`` damped;
3. the grid (scale/zero per row, or per group) searched up front on the original weights
   (Algorithm 1 line 5), except for groups without column act-order, whose grids are
   searched when the sweep reaches them (GPTQ's dynamic groups);
4. ``H_row`` damped, rows permuted per head by ``diag(H_row)`` (``act_order_row``) together
   with their grids;
5. columns permuted by ``diag(H_col)`` (``act_order_col``; per head for per-head ``H_col``);
   with groups this uses static groups in the original column order, so ``g_idx`` stays
   ``c // group_size`` (llm-compressor's "weight" act-order);
6. ``U_col = Chol(H_col^-1)^T`` and ``U_row = Chol(H_row^-1)^T``.

``finalize`` undoes the permutations and packs a :class:`QuantResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .grid import expand_params, find_params
from .hessian import (act_order_perm, add_damping, gather_last, gather_rows, inverse_perm,
                      mark_dead_channels, permute_square, upper_cholesky_of_inverse)
from .result import QuantResult


@dataclass
class Prepared:
    W3: torch.Tensor                 # (nh, dh, C) working weights, processing order
    H_col: torch.Tensor              # (Bc, C, C) damped, processing order; Bc in {1, nh}
    U_col: torch.Tensor              # (Bc, C, C)
    U_row: torch.Tensor | None       # (nh, dh, dh)
    maxq: int
    group_size: int | None
    dynamic_groups: bool
    scale: torch.Tensor | None       # (nh, dh, C) per column, or (nh, dh, 1); None if dynamic
    zero: torch.Tensor | None
    row_scale: torch.Tensor | None   # (nh, dh, G) processing row order; None if dynamic
    row_zero: torch.Tensor | None
    perm_col: torch.Tensor | None    # (C,) shared or (nh, C)
    perm_row: torch.Tensor | None    # (nh, dh)
    info: dict = field(default_factory=dict)
    # the damped Hessians in the original row/column order and the dead-column mask, for the
    # scale refinement after the sweep (references, not copies, unless act-order permuted them)
    H_col_fit: torch.Tensor | None = None   # (Bc, C, C)
    H_row_fit: torch.Tensor | None = None   # (nh, dh, dh)
    dead: torch.Tensor | None = None        # (Bc, C)

    @property
    def shared_col(self) -> bool:
        return self.H_col.shape[0] == 1


def prepare(W: torch.Tensor, H_col: torch.Tensor, H_row: torch.Tensor | None, n_heads: int,
            bits: int, sym: bool, grid: str, group_size: int | None, act_order_col: bool,
            act_order_row: bool, percdamp: float, dtype: torch.dtype,
            grid_kwargs: dict | None = None, overwrite_hessians: bool = False) -> Prepared:
    """``overwrite_hessians=True`` lets the solver damp ``H_col``/``H_row`` in place instead of
    copying them (callers that hand over their Hessians save one copy of each)."""
    grid_kwargs = grid_kwargs or {}
    R, C = W.shape
    nh, dh = n_heads, R // n_heads
    W3 = W.detach().to(dtype=dtype, copy=True).reshape(nh, dh, C)
    Hc = H_col.detach().to(dtype=dtype, copy=not overwrite_hessians)
    Hc = Hc.unsqueeze(0) if Hc.dim() == 2 else Hc
    dead = mark_dead_channels(Hc, W3)
    add_damping(Hc, percdamp)
    Hc_fit = Hc
    info = {"dead_columns": int(dead.sum()), "percdamp": percdamp}

    dynamic = group_size is not None and not act_order_col
    if dynamic:
        row_scale = row_zero = None
    else:
        row_scale, row_zero = find_params(W3, bits, sym, grid, H=Hc, group_size=group_size, **grid_kwargs)

    U_row = perm_row = Hr_fit = None
    if H_row is not None:
        Hr = H_row.detach().to(dtype=dtype, copy=not overwrite_hessians)
        info["dead_rows"] = int(mark_dead_channels(Hr).sum())
        add_damping(Hr, percdamp)
        Hr_fit = Hr
        if act_order_row:
            perm_row = act_order_perm(Hr)
            W3 = gather_rows(W3, perm_row)
            Hr = permute_square(Hr, perm_row)
            if row_scale is not None:
                row_scale = gather_rows(row_scale, perm_row)
                row_zero = gather_rows(row_zero, perm_row)
        U_row, chol_row = upper_cholesky_of_inverse(Hr, percdamp)
        info["row_cholesky_retries"] = chol_row.retries
        info["row_extra_damping"] = chol_row.extra_damping.tolist()

    perm_col = None
    if act_order_col:
        perm_col = act_order_perm(Hc)
        if perm_col.shape[0] == 1:
            perm_col = perm_col[0]
        W3 = gather_last(W3, perm_col)
        Hc = permute_square(Hc, perm_col)
    U_col, chol_col = upper_cholesky_of_inverse(Hc, percdamp)
    info["col_cholesky_retries"] = chol_col.retries
    info["col_extra_damping"] = chol_col.extra_damping.tolist()

    scale = zero = None
    if row_scale is not None:
        if group_size is None:
            scale, zero = row_scale, row_zero
        else:
            scale = expand_params(row_scale, group_size, C)
            zero = expand_params(row_zero, group_size, C)
            if perm_col is not None:
                scale, zero = gather_last(scale, perm_col), gather_last(zero, perm_col)
    return Prepared(W3=W3, H_col=Hc, U_col=U_col, U_row=U_row, maxq=2 ** bits - 1,
                    group_size=group_size, dynamic_groups=dynamic, scale=scale, zero=zero,
                    row_scale=row_scale, row_zero=row_zero, perm_col=perm_col,
                    perm_row=perm_row, info=info, H_col_fit=Hc_fit, H_row_fit=Hr_fit, dead=dead)


def group_params_fn(prep: Prepared, bits: int, sym: bool, grid: str, grid_kwargs: dict | None = None):
    """Grid of one group, searched on the current (updated) weights of its columns."""
    grid_kwargs = grid_kwargs or {}
    gs = prep.group_size

    def fn(col: int, Wg: torch.Tensor):
        H = prep.H_col[..., col:col + gs, col:col + gs] if grid == "hessian" else None
        return find_params(Wg, bits, sym, grid, H=H, group_size=None, **grid_kwargs)

    return fn


def kquant_group_params(kt, importance: torch.Tensor):
    """Dynamic-group callback for llama.cpp's k-quant super-blocks (``solvers.kquant``): each grid is
    searched on the super-block's current weights, weighted by ``importance`` (``diag(H_col)``,
    ``(..., C)`` broadcasting against the swept rows), and rounded to what the format stores.
    Returns ``(fn, grids)``; ``grids`` collects every call's :class:`kquant.KGrid` in call order."""
    from .kquant import superblock_grid
    grids = []

    def fn(col: int, Wg: torch.Tensor):
        g = superblock_grid(Wg, kt, importance[..., col:col + kt.block])
        grids.append(g)
        return g.scale.to(Wg.dtype), g.zero.to(Wg.dtype)

    return fn, grids


def kquant_fields(grids: list, calls_per_sweep: int, rows: tuple) -> dict:
    """The stored fields of every sweep's super-blocks, ``(*rows, n)`` each: ``grids`` is the callback's
    list (``calls_per_sweep`` super-blocks per sweep, sweeps in row order, ``rows`` = ``(nh, dh)``)."""
    out = {}
    for k in ("sc", "m", "d", "dmin"):
        if getattr(grids[0], k) is None:
            out[k] = None
            continue
        sweeps = [torch.cat([getattr(g, k).reshape(*g.scale.shape[:-1], -1)
                             for g in grids[i:i + calls_per_sweep]], dim=-1)
                  for i in range(0, len(grids), calls_per_sweep)]
        out[k] = torch.cat([t.reshape(rows[0], -1, t.shape[-1]) for t in sweeps], dim=1)
    return out


def kquant_result(kt, Q3, codes3, scale3, zero3, fields: dict, W: torch.Tensor, prep, method: str) -> QuantResult:
    """A :class:`QuantResult` on a k-quant grid: per-sub-block ``scale``/``zero`` (the offset ``m`` for
    the asymmetric types) and ``kquant``, the stored fields, all in the rows' original order."""
    R, C = W.shape
    perm = None if prep.perm_row is None else inverse_perm(prep.perm_row)

    def rows(t):   # (nh, dh, K) in processing order -> (R, K) in the original row order
        t = t.reshape(*prep.W3.shape[:2], -1)
        return (t if perm is None else gather_rows(t, perm)).reshape(R, -1)

    sub = lambda t: rows(t)[:, ::kt.sub].float().contiguous()  # noqa: E731   (per column -> per sub-block)
    out = QuantResult(Q=rows(Q3).to(W.dtype), codes=rows(codes3).to(torch.uint8), scale=sub(scale3),
                      zero=sub(zero3), bits=kt.bits, sym=not kt.offset, group_size=kt.sub, method=method,
                      info=prep.info)
    out.kquant = {"type": kt.name, **{k: None if v is None else rows(v) for k, v in fields.items()}}
    for k in ("sc", "m"):
        if out.kquant[k] is not None:
            out.kquant[k] = out.kquant[k].to(torch.int16)
    return out


def finalize(prep: Prepared, Q3: torch.Tensor, codes3: torch.Tensor, row_scale: torch.Tensor,
             row_zero: torch.Tensor, W: torch.Tensor, bits: int, sym: bool, method: str) -> QuantResult:
    """Undo column then row permutations and pack the result in the layout of ``W``."""
    if prep.perm_col is not None:
        inv = inverse_perm(prep.perm_col)
        Q3, codes3 = gather_last(Q3, inv), gather_last(codes3, inv)
    if prep.perm_row is not None:
        inv = inverse_perm(prep.perm_row)
        Q3, codes3 = gather_rows(Q3, inv), gather_rows(codes3, inv)
        row_scale, row_zero = gather_rows(row_scale, inv), gather_rows(row_zero, inv)
    R, C = W.shape
    return QuantResult(
        Q=Q3.reshape(R, C).to(W.dtype),
        codes=codes3.reshape(R, C).to(torch.uint8),
        scale=row_scale.reshape(R, -1).contiguous(),
        zero=row_zero.reshape(R, -1).contiguous(),
        bits=bits, sym=sym, group_size=prep.group_size, method=method, info=prep.info)
