"""Round-to-nearest baseline: every weight to the nearest level of its row's (or group's) grid."""

from __future__ import annotations

import torch

from .grid import dequantize_codes, expand_params, find_params, quantize_codes
from .hessian import add_damping
from .result import QuantResult
from .validation import (check_bits, check_col_hessian, check_grid, check_group_size, check_percdamp,
                         check_sym, check_weight, compute_dtype)


def rtn_quantize(W: torch.Tensor, bits: int, sym: bool = False, grid: str = "minmax",
                 group_size: int | None = None, H_col: torch.Tensor | None = None,
                 percdamp: float = 0.01, **grid_kwargs) -> QuantResult:
    """RTN with a MinMax, MMSE or Hessian grid (the latter needs ``H_col``); full result."""
    W = check_weight(W)
    bits, grid, sym = check_bits(bits), check_grid(grid), check_sym(sym)
    group_size = check_group_size(group_size, W.shape[1])
    percdamp = check_percdamp(percdamp)
    if grid == "hessian" and H_col is None:
        raise ValueError('grid="hessian" needs H_col for RTN')
    dtype = compute_dtype(W, H_col)
    H = None
    if H_col is not None and grid == "hessian":
        if check_col_hessian(H_col, W.shape[1]).dim() != 2:
            raise ValueError("RTN takes one shared H_col of shape (d_col, d_col)")
        H = H_col.detach().to(dtype=dtype, copy=True)
        add_damping(H, percdamp)
    Wc = W.detach().to(dtype)
    scale, zero = find_params(Wc, bits, sym, grid, H=H, group_size=group_size, **grid_kwargs)
    s = expand_params(scale, group_size, W.shape[1])
    z = expand_params(zero, group_size, W.shape[1])
    codes = quantize_codes(Wc, s, z, 2 ** bits - 1)
    Q = dequantize_codes(codes, s, z)
    return QuantResult(Q=Q.to(W.dtype), codes=codes.to(torch.uint8), scale=scale, zero=zero,
                       bits=bits, sym=sym, group_size=group_size, method="rtn")


def rtn(W: torch.Tensor, bits: int, sym: bool = False, grid: str = "minmax",
        group_size: int | None = None, **kwargs) -> torch.Tensor:
    """De-quantized RTN weights, same shape/dtype as ``W``."""
    return rtn_quantize(W, bits, sym=sym, grid=grid, group_size=group_size, **kwargs).Q
