"""Bit-packing of integer codes (1..8 bits) and the GPTQ / compressed-tensors int32 layouts.

``pack_bits`` / ``unpack_bits`` (our format): each row's codes as a little-endian bit stream,
8 codes -> ``bits`` bytes, stored as ``uint8``: exactly ``ceil(cols * bits / 8)`` bytes per row for
every bit width (3-bit included).

``pack_int32_rows`` / ``pack_int32_cols`` implement the int32 layouts other tools read: values
packed ``32 // bits`` per int32, lowest bits first, along the input dimension (GPTQ ``qweight``,
compressed-tensors ``weight_packed``) or the output dimension (GPTQ ``qzeros``). GPTQ's 3-bit layout
(32 values over three int32 words, crossing word boundaries) is the same little-endian bit stream.
"""

from __future__ import annotations

import torch


def _check(codes: torch.Tensor, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise ValueError(f"codes do not fit in {bits} bits (max {int(codes.max())})")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(R, C)`` integer codes -> ``(R, ceil(C * bits / 8))`` uint8."""
    _check(codes, bits)
    R, C = codes.shape
    C8 = -(-C // 8) * 8
    c = torch.zeros(R, C8, dtype=torch.int64, device=codes.device)
    c[:, :C] = codes.to(torch.int64)
    c = c.reshape(R, C8 // 8, 8)
    word = torch.zeros(R, C8 // 8, dtype=torch.int64, device=codes.device)
    for k in range(8):
        word |= c[:, :, k] << (bits * k)               # 8 codes = 8*bits <= 64 bits
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], dim=-1)
    return out.reshape(R, -1)[:, : -(-C * bits // 8)].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(R, ceil(cols * bits / 8))`` uint8 -> ``(R, cols)`` uint8."""
    R = packed.shape[0]
    n_words = -(-cols // 8)
    b = torch.zeros(R, n_words * bits, dtype=torch.int64, device=packed.device)
    b[:, : packed.shape[1]] = packed.to(torch.int64)
    b = b.reshape(R, n_words, bits)
    word = torch.zeros(R, n_words, dtype=torch.int64, device=packed.device)
    for j in range(bits):
        word |= b[:, :, j] << (8 * j)
    mask = 2 ** bits - 1
    codes = torch.stack([(word >> (bits * k)) & mask for k in range(8)], dim=-1)
    return codes.reshape(R, -1)[:, :cols].to(torch.uint8)


def _pack_stream_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0: ``(N, M)`` values -> ``(ceil(N * bits / 32), M)`` int32.

    Value ``i`` occupies bits ``i*bits .. i*bits+bits-1`` of the little-endian stream (values may
    straddle two words); a last partial word is zero-padded.
    """
    N, M = values.shape
    v = values.to(torch.int64)
    out = torch.zeros(-(-N * bits // 32), M, dtype=torch.int64, device=values.device)
    for i in range(N):
        w, off = divmod(i * bits, 32)
        out[w] |= (v[i] << off) & 0xFFFFFFFF
        if off + bits > 32:                           # e.g. 3-bit values straddle two words
            out[w + 1] |= v[i] >> (32 - off)
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out)   # two's complement int32
    return out.to(torch.int32)


def _unpack_stream_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    p = packed.to(torch.int64) & 0xFFFFFFFF
    mask = 2 ** bits - 1
    rows = []
    for i in range(n):
        w, off = divmod(i * bits, 32)
        v = p[w] >> off
        if off + bits > 32:
            v = v | (p[w + 1] << (32 - off))
        rows.append(v & mask)
    return torch.stack(rows).to(torch.int32)


def pack_int32_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qweight``: ``(in, out)`` codes packed along ``in`` -> ``(ceil(in * bits / 32), out)`` int32."""
    _check(values, bits)
    return _pack_stream_int32(values, bits)


def unpack_int32_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return _unpack_stream_int32(packed, bits, n)


def pack_int32_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along the last dim: ``(N, M)`` -> ``(N, ceil(M * bits / 32))`` int32 (GPTQ ``qzeros``,
    compressed-tensors ``weight_packed``)."""
    _check(values, bits)
    return _pack_stream_int32(values.T.contiguous(), bits).T.contiguous()


def unpack_int32_cols(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    return _unpack_stream_int32(packed.T.contiguous(), bits, m).T.contiguous()
