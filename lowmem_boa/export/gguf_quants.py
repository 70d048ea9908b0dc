"""GGUF bytes of k-quant super-blocks (llama.cpp's ``block_q2_K`` ... ``block_q6_K`` layouts) from
the integer codes and stored fields a solver produced on ``solvers.kquant`` grids."""

from __future__ import annotations

import numpy as np
import torch

from ..solvers.kquant import KType, ktype


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16).reshape(-1, 1)).view(np.uint8)


def _low2(q: np.ndarray) -> np.ndarray:
    """2-bit fields of 256 codes as Q2_K/Q3_K store them: byte 32h + l holds elements 128h + l,
    + 32, + 64, + 96 at bits 0-1, 2-3, 4-5, 6-7."""
    qq = (q & 3).reshape(-1, 2, 4, 32).astype(np.uint8)
    return (qq[:, :, 0] | qq[:, :, 1] << 2 | qq[:, :, 2] << 4 | qq[:, :, 3] << 6).reshape(-1, 64)


def _scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    a = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    b = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([a, b, c], 1)


def _pack_legacy(q: np.ndarray, d: torch.Tensor, dmin: torch.Tensor | None, kt: KType) -> np.ndarray:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0: float16 d (and the minimum), then the codes (byte j holds
    elements j and j + 16 in its low / high nibble; the 5th bits in a little-endian uint32)."""
    nb = q.shape[0]
    parts = [_f16_bytes(d.numpy())]
    if kt.offset:
        parts.append(_f16_bytes(dmin.numpy()))
    if kt.name == "q8_0":
        parts.append((q - 128).astype(np.int8).view(np.uint8))
    else:
        if kt.bits == 5:
            hi = ((q >> 4) & 1).astype(np.uint32)
            qh = (hi << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
            parts.append(np.ascontiguousarray(qh.astype("<u4").reshape(nb, 1)).view(np.uint8))
        lo = (q & 15).astype(np.uint8)
        parts.append(lo[:, :16] | (lo[:, 16:] << 4))
    out = np.concatenate(parts, 1)
    assert out.shape == (nb, kt.type_size), (kt.name, out.shape)
    return np.ascontiguousarray(out)


def pack_superblocks(codes: torch.Tensor, sc: torch.Tensor | None, m: torch.Tensor | None, d: torch.Tensor,
                     dmin: torch.Tensor | None, kt: KType | str) -> np.ndarray:
    """GGUF bytes of blocks: ``codes`` ``(nb, block)`` (0..2^b−1), ``sc`` / ``m`` ``(nb, n_sub)``
    (k-quants; None for the 32-column types), ``d`` / ``dmin`` ``(nb,)`` float16 -> ``(nb, type_size)``
    uint8."""
    kt = ktype(kt) if isinstance(kt, str) else kt
    q = codes.to(torch.int64).numpy()
    nb = q.shape[0]
    if kt.legacy:
        return _pack_legacy(q, d, dmin, kt)
    scn = sc.to(torch.int64).numpy()
    dd = _f16_bytes(d.numpy())
    if kt.name == "q2_k":
        scales = (scn | (m.to(torch.int64).numpy() << 4)).astype(np.uint8)
        out = np.concatenate([scales, _low2(q), dd, _f16_bytes(dmin.numpy())], 1)
    elif kt.name == "q3_k":
        hi = (q >> 2).astype(np.uint8).reshape(nb, 8, 32)
        hmask = np.zeros((nb, 32), np.uint8)
        for b in range(8):
            hmask |= hi[:, b] << b
        s = (scn + 32).astype(np.uint8)
        scales = np.zeros((nb, 12), np.uint8)
        scales[:, :8] = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
        for j in range(16):
            scales[:, 8 + j % 4] |= (s[:, j] >> 4) << (2 * (j // 4))
        out = np.concatenate([hmask, _low2(q), scales, dd], 1)
    elif kt.name in ("q4_k", "q5_k"):
        lo = (q & 15).reshape(nb, 4, 2, 32).astype(np.uint8)
        qs = (lo[:, :, 0] | lo[:, :, 1] << 4).reshape(nb, 128)
        parts = [dd, _f16_bytes(dmin.numpy()), _scale_min_k4(scn, m.to(torch.int64).numpy())]
        if kt.name == "q5_k":
            hi = (q >> 4).astype(np.uint8).reshape(nb, 8, 32)
            qh = np.zeros((nb, 32), np.uint8)
            for b in range(8):
                qh |= hi[:, b] << b
            parts.append(qh)
        out = np.concatenate(parts + [qs], 1)
    else:   # q6_k
        qq = q.reshape(nb, 2, 4, 32).astype(np.uint8)
        ql = np.concatenate([(qq[:, :, 0] & 15) | (qq[:, :, 2] & 15) << 4,
                             (qq[:, :, 1] & 15) | (qq[:, :, 3] & 15) << 4], 2).reshape(nb, 128)
        qh = ((qq[:, :, 0] >> 4) | (qq[:, :, 1] >> 4) << 2 | (qq[:, :, 2] >> 4) << 4
              | (qq[:, :, 3] >> 4) << 6).reshape(nb, 64)
        out = np.concatenate([ql, qh, scn.astype(np.int8).view(np.uint8), dd], 1)
    assert out.shape == (nb, kt.type_size), (kt.name, out.shape)
    return np.ascontiguousarray(out)
