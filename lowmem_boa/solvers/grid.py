"""Uniform integer grids: the quantizer itself and the search for its scale/zero.

A grid for one row (or one group of a row) is ``(scale, zero)``; a weight ``w``
maps to the integer code ``c = clamp(round(w / scale) + zero, 0, 2**bits - 1)``
and de-quantizes to ``scale * (c - zero)``. ``zero`` is an integer-valued float.
Every row/group therefore has at most ``2**bits`` distinct levels.

Grid searches (``find_params``):

* ``"minmax"`` – the range ``[min(w, 0), max(w, 0)]`` split into ``2**bits - 1`` steps
  (asymmetric) or ``[-m, m]`` with ``m = max|w|`` (symmetric, ``zero = 2**(bits-1)``).
* ``"mmse"`` – shrink the MinMax range by ``p = 1 - i / n_grid`` for
  ``i < max_shrink * n_grid`` and keep, per row/group, the candidate with the smallest
  weight error ``sum |Q(w) - w|**norm``.
* ``"hessian"`` – same candidates, scored by the layer-wise reconstruction error
  ``(Q(w) - w) H (Q(w) - w)^T`` of the row (or, for groups, with the diagonal block of
  ``H`` over the group's columns).

For asymmetric grids each shrink factor is tried with the zero-point rounded down and
up. With ``coarse=k > 1`` the shrink factors are searched coarse to fine: every ``k``-th first,
then the ``k - 1`` on each side of each row's best -- about ``2 sqrt(n)`` of the ``n`` candidates
(48 of 160 at ``k = 8``), each a ``rows x C x C`` product for the Hessian grid; not guaranteed to
find the full search's optimum (measured in tests/test_grid.py and docs/results.md). The MinMax grid is always the first candidate and is replaced only by a strictly
better one, so MMSE/Hessian grids are never worse than MinMax on their own objective.
"""

from __future__ import annotations

import math

import torch

from .validation import check_bits, check_grid, check_sym


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of ``x`` on the grid ``(scale, zero)``."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return dequantize_codes(quantize_codes(x, scale, zero, maxq), scale, zero)


def _minmax_range(x: torch.Tensor, sym: bool):
    """Per-row range over the last dim, always containing 0 (so 0 is exactly representable)."""
    xmin = torch.clamp(x.amin(-1), max=0)
    xmax = torch.clamp(x.amax(-1), min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    return xmin, xmax


def _zero_point(xmin, xmax, maxq: int):
    """Real-valued zero-point ``-xmin / scale`` of an asymmetric range, in ``[0, maxq]``.

    It does not depend on shrinking the range by a common factor, so it is computed once.
    Values within rounding noise of an integer are snapped to it, so that ``floor``/``ceil``
    do not depend on the last bit of the weights (which differs between mathematically
    equal update orders).
    """
    zf = (-xmin / (xmax - xmin)) * maxq
    zr = torch.round(zf)
    zf = torch.where((zf - zr).abs() < 1e-4, zr, zf)
    return zf.clamp(0, maxq)


def _params_from_range(xmin, xmax, maxq: int, sym: bool, zf=None, rounding=torch.round):
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = rounding(_zero_point(xmin, xmax, maxq) if zf is None else zf)
    return scale, zero


def _group_view(W: torch.Tensor, group_size: int | None):
    """``(..., R, C) -> (..., R, G, g)`` zero-padding the last group if needed."""
    C = W.shape[-1]
    if group_size is None:
        return W.unsqueeze(-2), 1, C
    G = math.ceil(C / group_size)
    pad = G * group_size - C
    if pad:
        W = torch.nn.functional.pad(W, (0, pad))
    return W.reshape(*W.shape[:-1], G, group_size), G, group_size


def _hessian_blocks(H: torch.Tensor, group_size: int | None, C: int):
    """``(..., C, C) -> (..., G, g, g)`` diagonal blocks, zero-padded like ``_group_view``."""
    if group_size is None:
        return H.unsqueeze(-3)
    G = math.ceil(C / group_size)
    pad = G * group_size - C
    if pad:
        H = torch.nn.functional.pad(H, (0, pad, 0, pad))
    Hb = H.reshape(*H.shape[:-2], G, group_size, G, group_size)
    # the k-th diagonal block is Hb[..., k, :, k, :]
    return torch.diagonal(Hb, dim1=-4, dim2=-2).movedim(-1, -3)


def _score(D: torch.Tensor, objective: str, Hb, norm: float) -> torch.Tensor:
    """Error of each row/group. ``D`` is ``(..., R, G, g)``."""
    if objective == "hessian":
        # (..., G, R, g) @ (..., G, g, g) -> (..., G, R, g)
        Dt = D.movedim(-2, -3)
        return ((Dt @ Hb) * Dt).sum(-1).movedim(-2, -1)
    return D.abs().pow(norm).sum(-1)


def find_params(W: torch.Tensor, bits: int, sym: bool = False, grid: str = "minmax",
                H: torch.Tensor | None = None, group_size: int | None = None,
                n_grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4, coarse: int = 1):
    """Search the grid of every row (or group) of ``W``.

    ``W`` is ``(..., R, C)``; ``H`` (only for ``grid="hessian"``) is ``(C, C)`` or
    ``(..., C, C)`` broadcastable against ``W``'s leading dims (e.g. one Hessian per
    attention head). Returns ``(scale, zero)``, each ``(..., R, G)`` with
    ``G = ceil(C / group_size)`` (``G = 1`` per-channel), in the dtype of ``W``.
    """
    bits = check_bits(bits)
    check_grid(grid)
    check_sym(sym)
    if grid == "hessian" and H is None:
        raise ValueError('grid="hessian" needs the column Hessian H')
    maxq = 2 ** bits - 1
    C = W.shape[-1]
    if W.dim() > 2 and (H is None or all(n == 1 for n in H.shape[:-2])):
        # one Hessian for every row: search all rows as one matrix (one big matmul per candidate)
        H = None if H is None else H.reshape(C, C)
        scale, zero = find_params(W.reshape(-1, C), bits, sym, grid, H, group_size, n_grid, max_shrink, norm, coarse)
        return scale.reshape(*W.shape[:-1], -1), zero.reshape(*W.shape[:-1], -1)
    Wg, G, g = _group_view(W, group_size)
    xmin, xmax = _minmax_range(Wg, sym)
    best_scale, best_zero = _params_from_range(xmin, xmax, maxq, sym)
    if grid == "minmax":
        return best_scale, best_zero

    Hb = _hessian_blocks(H.to(W.dtype), group_size, C) if grid == "hessian" else None

    def error(scale, zero):
        D = fake_quantize(Wg, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq) - Wg
        return _score(D, grid, Hb, norm)

    best_err = error(best_scale, best_zero)
    roundings = (torch.round,) if sym else (torch.floor, torch.ceil)
    zf = None if sym else _zero_point(xmin, xmax, maxq)
    n_shrink = int(max_shrink * n_grid)
    if coarse <= 1:
        for i in range(n_shrink):
            p = 1 - i / n_grid
            for rounding in roundings:
                scale, zero = _params_from_range(p * xmin, p * xmax, maxq, sym, zf, rounding)
                err = error(scale, zero)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
        return best_scale, best_zero
    best_i = torch.zeros_like(xmin)          # the MinMax grid is shrink step 0
    for i in range(0, n_shrink, coarse):     # coarse: every k-th shrink factor
        for rounding in roundings:
            scale, zero = _params_from_range((1 - i / n_grid) * xmin, (1 - i / n_grid) * xmax, maxq, sym, zf,
                                             rounding)
            err = error(scale, zero)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_i = torch.where(better, torch.full_like(best_i, i), best_i)
    center = best_i.clone()
    for d in [d for k in range(1, coarse) for d in (-k, k)]:   # fine: around each row's coarse best
        i = center + d
        valid = (i >= 0) & (i < n_shrink)
        p = 1 - i.clamp(0, n_shrink - 1) / n_grid
        for rounding in roundings:
            scale, zero = _params_from_range(p * xmin, p * xmax, maxq, sym, zf, rounding)
            err = error(scale, zero)
            better = valid & (err < best_err)
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def expand_params(param: torch.Tensor, group_size: int | None, C: int) -> torch.Tensor:
    """``(..., R, G) -> (..., R, C)``: the parameter of each column's group."""
    if group_size is None:
        return param.expand(*param.shape[:-1], C)
    g_idx = torch.arange(C, device=param.device) // group_size
    return param[..., g_idx]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild de-quantized weights from integer codes and per-row/per-group grids.

    ``codes`` is ``(R, C)`` integer, ``scale``/``zero`` are ``(R, G)``. The arithmetic is
    the same as inside the solvers, so this reproduces their ``Q`` bit for bit.
    """
    C = codes.shape[-1]
    s = expand_params(scale, group_size, C)
    z = expand_params(zero, group_size, C)
    Q = dequantize_codes(codes.to(scale.dtype), s, z)
    return Q if dtype is None else Q.to(dtype)


def grid_error(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               objective: str, H: torch.Tensor | None = None, group_size: int | None = None,
               norm: float = 2.4) -> torch.Tensor:
    """Per row/group error of the grid ``(scale, zero)`` on the objective of ``find_params``."""
    maxq = 2 ** check_bits(bits) - 1
    Wg, _, _ = _group_view(W, group_size)
    D = fake_quantize(Wg, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq) - Wg
    Hb = _hessian_blocks(H.to(W.dtype), group_size, W.shape[-1]) if objective == "hessian" else None
    return _score(D, objective, Hb, norm)
