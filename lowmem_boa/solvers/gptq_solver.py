"""GPTQ/OPTQ: column-wise Hessian ``H_col`` only, all rows quantized simultaneously."""

from __future__ import annotations

import torch

from .optq import optq_sweep
from .prepare import finalize, group_params_fn, prepare
from .refine import refine_result
from .result import QuantResult
from .validation import (check_bits, check_col_hessian, check_grid, check_group_size, check_percdamp,
                         check_positive_int, check_sym, check_weight, compute_dtype)


def validate_gptq_args(W, H_col, bits, sym, grid, group_size, block_size, percdamp):
    W = check_weight(W)
    if not isinstance(H_col, torch.Tensor) or H_col.dim() != 2:
        raise ValueError("gptq takes one shared H_col of shape (d_col, d_col), got "
                         f"{tuple(H_col.shape) if isinstance(H_col, torch.Tensor) else type(H_col).__name__}")
    check_col_hessian(H_col, W.shape[1])
    return (W, check_bits(bits), check_sym(sym), check_grid(grid),
            check_group_size(group_size, W.shape[1]), check_positive_int("block_size", block_size),
            check_percdamp(percdamp))


def gptq_quantize(W: torch.Tensor, H_col: torch.Tensor, bits: int, sym: bool = False,
                  grid: str = "hessian", group_size: int | None = None, act_order: bool = False,
                  block_size: int = 128, percdamp: float = 0.01, overwrite_hessians: bool = False,
                  refine_sweeps: int = 0, **grid_kwargs) -> QuantResult:
    """GPTQ with lazy block updates; returns codes and grids too (see :class:`QuantResult`).

    ``overwrite_hessians=True``: ``H_col`` may be modified in place (saves a copy).
    ``refine_sweeps > 0``: the scales are refined once the codes are fixed (``solvers.refine``;
    the rows are independent, so one sweep is the optimum)."""
    W, bits, sym, grid, group_size, block_size, percdamp = validate_gptq_args(
        W, H_col, bits, sym, grid, group_size, block_size, percdamp)
    dtype = compute_dtype(W, H_col)
    prep = prepare(W, H_col, None, 1, bits, sym, grid, group_size, bool(act_order), False,
                   percdamp, dtype, grid_kwargs, overwrite_hessians)
    gp = group_params_fn(prep, bits, sym, grid, grid_kwargs) if prep.dynamic_groups else None
    res = optq_sweep(prep.W3, prep.U_col, prep.maxq, block_size, prep.scale, prep.zero,
                     group_size, gp)
    row_scale = res.group_scale if prep.dynamic_groups else prep.row_scale
    row_zero = res.group_zero if prep.dynamic_groups else prep.row_zero
    out = finalize(prep, res.Q, res.codes, row_scale, row_zero, W, bits, sym, "gptq")
    return refine_result(prep, out, W, refine_sweeps)


def gptq(W: torch.Tensor, H_col: torch.Tensor, bits: int, sym: bool = False, grid: str = "hessian",
         group_size: int | None = None, act_order: bool = False, block_size: int = 128,
         percdamp: float = 0.01, **grid_kwargs) -> torch.Tensor:
    """De-quantized GPTQ weights, same shape/dtype as ``W``."""
    return gptq_quantize(W, H_col, bits, sym=sym, grid=grid, group_size=group_size,
                         act_order=act_order, block_size=block_size, percdamp=percdamp,
                         **grid_kwargs).Q
