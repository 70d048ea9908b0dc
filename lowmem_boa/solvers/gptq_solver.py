"""GPTQ/OPTQ: column-wise Hessian ``H_col`` only, all rows quantized simultaneously."""

from __future__ import annotations

import torch

from .kquant import ktype
from .optq import optq_sweep
from .prepare import finalize, group_params_fn, kquant_fields, kquant_group_params, kquant_result, prepare
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
                  refine_sweeps: int = 0, kquant: str | None = None, **grid_kwargs) -> QuantResult:
    """GPTQ with lazy block updates; returns codes and grids too (see :class:`QuantResult`).

    ``overwrite_hessians=True``: ``H_col`` may be modified in place (saves a copy).
    ``refine_sweeps > 0``: the scales are refined once the codes are fixed (``solvers.refine``;
    the rows are independent, so one sweep is the optimum).
    ``kquant`` (``"q2_k"`` ... ``"q6_k"``): quantize onto llama.cpp's k-quant grid instead
    (:func:`gptq_kquant`; ``bits``, ``sym``, ``grid`` and ``group_size`` are the type's)."""
    if kquant is not None:
        if act_order or group_size is not None or refine_sweeps:
            raise ValueError("k-quant grids take no act-order, --group-size or scale refinement: the type fixes "
                             "the super-blocks and their stored scales")
        return gptq_kquant(W, H_col, kquant, block_size, percdamp, overwrite_hessians)
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


def gptq_kquant(W: torch.Tensor, H_col: torch.Tensor, kquant: str, block_size: int = 128, percdamp: float = 0.01,
                overwrite_hessians: bool = False) -> QuantResult:
    """GPTQ onto a k-quant grid (``solvers.kquant``): when the sweep reaches a 256-column super-block
    its sub-block scales and minimums are searched on the weights as updated so far (weighted by
    ``diag(H_col)``, the importance llama.cpp's imatrix measures), rounded to the integers and float16
    super-scales the format stores, and the super-block's columns are then solved on exactly that grid.
    ``result.kquant`` holds the stored fields for the GGUF writer."""
    kt = ktype(kquant)
    W, _, _, _, _, block_size, percdamp = validate_gptq_args(W, H_col, kt.bits, not kt.offset, "minmax", None,
                                                             block_size, percdamp)
    R, C = W.shape
    if C % kt.block:
        raise ValueError(f"{kt.name} needs the input size to be a multiple of {kt.block}, got {C}")
    dtype = compute_dtype(W, H_col)
    imp = torch.diagonal(H_col).to(dtype=dtype, copy=True)      # before prepare may damp H_col in place
    prep = prepare(W, H_col, None, 1, kt.bits, not kt.offset, "minmax", kt.block, False, False, percdamp, dtype,
                   {}, overwrite_hessians)
    params, grids = kquant_group_params(kt, imp)
    res = optq_sweep(prep.W3, prep.U_col, prep.maxq, block_size, None, None, kt.block, params, offset=kt.offset)
    return kquant_result(kt, res.Q, res.codes, res.group_scale, res.group_zero,
                         kquant_fields(grids, C // kt.block, (1, R)), W, prep, "gptq")


def gptq(W: torch.Tensor, H_col: torch.Tensor, bits: int, sym: bool = False, grid: str = "hessian",
         group_size: int | None = None, act_order: bool = False, block_size: int = 128,
         percdamp: float = 0.01, **grid_kwargs) -> torch.Tensor:
    """De-quantized GPTQ weights, same shape/dtype as ``W``."""
    return gptq_quantize(W, H_col, bits, sym=sym, grid=grid, group_size=group_size,
                         act_order=act_order, block_size=block_size, percdamp=percdamp,
                         **grid_kwargs).Q
