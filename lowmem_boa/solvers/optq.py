"""Blocked OPTQ sweep over columns (Algorithm 2 of the BoA paper, GPTQ's lazy batch updates).

One kernel serves both solvers:

* GPTQ calls it once on ``W`` viewed as ``(1, d_row, d_col)`` with one shared ``U``;
* BoA calls it once per row index ``j`` on the stacked ``j``-th rows of all heads, viewed as
  ``(1, n_heads, d_col)`` (shared ``H_col``) or ``(n_heads, 1, d_col)`` (one ``H_col`` per
  head), so all heads are quantized simultaneously as one batched tensor.

Columns are processed in blocks of ``block_size``: inside a block the remaining columns of
the block receive rank-1 updates column by column; the columns after the block receive the
whole block's update as one matmul when the block is done. This is algebraically identical
to updating every remaining column after every column (``optq_reference`` in
``reference.py``), which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .grid import dequantize_codes, quantize_codes


def aligned_block_size(block_size: int, group_size: int | None) -> int:
    """Block size such that every group lies inside one block or starts at a block start.

    With that alignment a group's grid, computed when the sweep reaches its first column,
    sees fully updated weights, exactly as in the column-by-column reference.
    """
    if group_size is None:
        return block_size
    if group_size <= block_size:
        return (block_size // group_size) * group_size
    for b in range(block_size, 0, -1):
        if group_size % b == 0:
            return b
    return 1


@dataclass
class SweepResult:
    Q: torch.Tensor       # (B, R, C) de-quantized values
    codes: torch.Tensor   # (B, R, C) integer codes (float storage)
    E: torch.Tensor       # (B, R, C) scaled errors (w - q) / U[c, c]
    group_scale: torch.Tensor | None = None  # (B, R, G) for dynamic groups
    group_zero: torch.Tensor | None = None


def _codes(w, s, z, maxq: int, offset: bool):
    """Integer-zero grids ``s (clamp(round(w / s) + z) - z)``; offset grids (llama.cpp's asymmetric
    k-quants) ``s clamp(round((w + z) / s)) - z`` with ``z`` the real offset ``m``."""
    return torch.clamp(torch.round((w + z) / s), 0, maxq) if offset else quantize_codes(w, s, z, maxq)


def _dequant(c, s, z, offset: bool):
    return s * c - z if offset else dequantize_codes(c, s, z)


def _inner_torch(W1, U1, d1, S1, Z1, start: int, stop: int, maxq: int, offset: bool = False) -> None:
    """Columns ``start..stop-1`` of one block: quantize each and update the later columns.

    ``S1``/``Z1`` are the block's grids, ``(B, R, n)`` or ``(B, R, 1)``.
    """
    one = S1.shape[-1] == 1
    for i in range(start, stop):
        s, z = (S1[..., 0], Z1[..., 0]) if one else (S1[..., i], Z1[..., i])
        w = W1[..., i]
        q = _dequant(_codes(w, s, z, maxq, offset), s, z, offset)
        e = (w - q) / d1[..., i]
        W1[..., i + 1:].addcmul_(e.unsqueeze(-1), U1[..., i:i + 1, i + 1:], value=-1)


def _inner_numpy(W1, U1, d1, S1, Z1, start: int, stop: int, maxq: int, offset: bool = False) -> None:
    """Same arithmetic as :func:`_inner_torch` on CPU through numpy views of the tensors.

    Per-op overhead on tiny vectors is ~0.5 us in numpy against ~3 us in torch; BoA runs
    ``head_dim * d_col`` of these steps, so this is most of its CPU time.
    """
    Wn, Un, dn = W1.numpy(), U1.numpy(), d1.numpy()
    Sn, Zn = S1.numpy(), Z1.numpy()
    one = Sn.shape[-1] == 1
    s, z = Sn[..., 0], Zn[..., 0]
    mul, sub, div, rint, maximum, minimum = np.multiply, np.subtract, np.divide, np.rint, np.maximum, np.minimum
    for i in range(start, stop):
        if not one:
            s, z = Sn[..., i], Zn[..., i]
        w = Wn[..., i]
        if offset:                     # offset grid: clamp(round((w + z) / s), 0, maxq), then s * code - z
            t = np.add(w, z)
            div(t, s, out=t)
            rint(t, out=t)
            maximum(t, 0, out=t)
            minimum(t, maxq, out=t)
            mul(t, s, out=t)
            t -= z
        else:
            t = div(w, s)              # quantize: clamp(round(w / s) + z, 0, maxq)
            rint(t, out=t)
            t += z
            maximum(t, 0, out=t)
            minimum(t, maxq, out=t)
            t -= z                     # de-quantize: s * (code - z)
            mul(t, s, out=t)
        sub(w, t, out=t)               # e = (w - q) / U[i, i]
        div(t, dn[..., i], out=t)
        Wn[..., i + 1:] -= t[..., None] * Un[..., i:i + 1, i + 1:]


#: Inner-loop backend when a sweep does not name one: None = numpy on CPU, torch elsewhere.
DEFAULT_BACKEND: str | None = None


def _pick_inner(device: torch.device, backend: str | None):
    backend = backend or DEFAULT_BACKEND or ("numpy" if device.type == "cpu" else "torch")
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
    if backend == "numpy" and device.type != "cpu":
        raise ValueError("the numpy inner loop runs on CPU tensors only")
    return _inner_numpy if backend == "numpy" else _inner_torch


GroupParamsFn = Callable[[int, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def optq_sweep(W: torch.Tensor, U: torch.Tensor, maxq: int, block_size: int = 128,
               scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
               group_size: int | None = None, group_params: GroupParamsFn | None = None,
               backend: str | None = None, offset: bool = False) -> SweepResult:
    """Quantize ``W`` (``(B, R, C)``, modified in place) column by column in blocks.

    ``U`` is ``(B, C, C)`` or ``(1, C, C)``, upper triangular with ``U^T U = H^{-1}`` in the
    processing order of the columns. The grid is either given per column (``scale``/``zero``
    of shape ``(B, R, C)``, or ``(B, R, 1)`` for one grid per row), or computed for each
    group of ``group_size`` columns when the sweep reaches its first column, by
    ``group_params(col, W_group) -> (scale, zero)`` each ``(B, R, 1)``, or ``(B, R, group_size)``
    for a grid per column of the group (llama.cpp's k-quant super-blocks; dynamic groups).
    ``backend`` selects the per-column loop: ``"numpy"`` (default on CPU) or ``"torch"``.
    ``offset``: ``zero`` is a real offset (``w = s q - zero``, ``solvers.kquant``), not a zero-point.
    """
    B, R, C = W.shape
    dynamic = group_params is not None
    if dynamic and group_size is None:
        raise ValueError("dynamic groups need group_size")
    inner = _pick_inner(W.device, backend)
    bs = aligned_block_size(block_size, group_size if dynamic else None)
    Q = torch.empty_like(W)
    codes = torch.empty_like(W)
    E = torch.empty_like(W)
    per_column = scale is not None and scale.shape[-1] == C and C > 1
    g_scales, g_zeros = [], []
    diagU = torch.diagonal(U, dim1=-2, dim2=-1)  # (B', C)
    if dynamic:
        S1 = torch.empty_like(W[..., :bs])
        Z1 = torch.empty_like(S1)
    elif not per_column:
        S1, Z1 = scale[..., :1], zero[..., :1]

    for i1 in range(0, C, bs):
        i2 = min(i1 + bs, C)
        n = i2 - i1
        W1 = W[..., i1:i2].clone()
        U1 = U[..., i1:i2, i1:i2].contiguous()
        d1 = diagU[..., i1:i2].unsqueeze(-2).contiguous()  # (B', 1, n)
        if per_column:
            S1, Z1 = scale[..., i1:i2].contiguous(), zero[..., i1:i2].contiguous()
        if dynamic:
            # walk the block group segment by group segment; at a group's first column its
            # grid is searched on the up-to-date weights of the whole group
            pos = i1
            while pos < i2:
                seg_end = min((pos // group_size + 1) * group_size, i2)
                if pos % group_size == 0:
                    g0 = pos
                    end = min(pos + group_size, C)
                    # inside the block the up-to-date values are in W1; a group that runs
                    # past the block starts at the block start, where W has every lazy update
                    src = W1[..., pos - i1:end - i1] if end <= i2 else W[..., pos:end]
                    s_cur, z_cur = group_params(pos, src)
                    g_scales.append(s_cur)
                    g_zeros.append(z_cur)
                if s_cur.shape[-1] == 1:
                    S1[..., pos - i1:seg_end - i1] = s_cur
                    Z1[..., pos - i1:seg_end - i1] = z_cur
                else:   # a grid per column of the group
                    S1[..., pos - i1:seg_end - i1] = s_cur[..., pos - g0:seg_end - g0]
                    Z1[..., pos - i1:seg_end - i1] = z_cur[..., pos - g0:seg_end - g0]
                inner(W1, U1, d1, S1, Z1, pos - i1, min(seg_end - i1, n - 1), maxq, offset)
                pos = seg_end
        else:
            inner(W1, U1, d1, S1, Z1, 0, n - 1, maxq, offset)  # the last column updates nothing
        # Column i of W1 was last changed before column i was quantized, so W1 now holds the
        # value every column had when it was quantized: codes, Q and errors follow
        # element-wise with exactly the arithmetic of the loop.
        s_blk, z_blk = (S1[..., :n], Z1[..., :n]) if (dynamic or per_column) else (S1, Z1)
        c1 = _codes(W1, s_blk, z_blk, maxq, offset)
        q1 = _dequant(c1, s_blk, z_blk, offset)
        codes[..., i1:i2] = c1
        Q[..., i1:i2] = q1
        E1 = (W1 - q1) / d1
        E[..., i1:i2] = E1
        if i2 < C:
            W[..., i2:].sub_(E1 @ U[..., i1:i2, i2:])

    result = SweepResult(Q=Q, codes=codes, E=E)
    if dynamic:
        result.group_scale = torch.cat(g_scales, dim=-1)
        result.group_zero = torch.cat(g_zeros, dim=-1)
    return result
