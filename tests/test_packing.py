"""Bit packing: round trips for every width, sizes, and the int32 layouts other tools read."""

import pytest
import torch

from lowmem_boa.export.packing import (pack_bits, pack_int32_cols, pack_int32_rows, unpack_bits,
                                       unpack_int32_cols, unpack_int32_rows)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 64, 100])
def test_pack_bits_round_trip_and_size(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(0, 2 ** bits, (5, cols), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-cols * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, cols), codes)


def test_pack_bits_is_a_little_endian_stream():
    codes = torch.tensor([[1, 2, 3, 0, 1, 2, 3, 0]], dtype=torch.uint8)  # 2 bits: 0b00111001 0b00111001
    assert pack_bits(codes, 2).tolist() == [[0b00111001, 0b00111001]]
    codes3 = torch.tensor([[5, 3, 7, 1, 0, 6, 2, 4]], dtype=torch.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes3[0]))
    assert pack_bits(codes3, 3).tolist() == [[(stream >> (8 * j)) & 0xFF for j in range(3)]]


def test_pack_bits_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        pack_bits(torch.tensor([[4]], dtype=torch.uint8), 2)


def _gptq_unpack_reference(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent unpacking written from GPTQ's documented layout (shifts per word)."""
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    out = []
    if bits in (2, 4, 8):
        per = 32 // bits
        for w in range(q.shape[0]):
            for j in range(per):
                out.append((q[w] >> (bits * j)) & (2 ** bits - 1))
        return torch.stack(out)
    assert bits == 3  # 32 values in 3 words: 10 + (2|1) + 10 + (1|2) + 10
    for w0 in range(0, q.shape[0], 3):
        a, b, c = q[w0], q[w0 + 1], q[w0 + 2]
        out += [(a >> (3 * j)) & 7 for j in range(10)]
        out.append(((a >> 30) & 3) | ((b & 1) << 2))
        out += [(b >> (3 * j + 1)) & 7 for j in range(10)]
        out.append(((b >> 31) & 1) | ((c & 3) << 1))
        out += [(c >> (3 * j + 2)) & 7 for j in range(10)]
    return torch.stack(out)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int32_layouts_match_an_independent_unpacker(bits):
    g = torch.Generator().manual_seed(bits)
    vals = torch.randint(0, 2 ** bits, (64, 12), generator=g, dtype=torch.int32)
    packed = pack_int32_rows(vals, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 12)
    assert torch.equal(_gptq_unpack_reference(packed, bits).to(torch.int32), vals)
    assert torch.equal(unpack_int32_rows(packed, bits, 64), vals)
    cols = pack_int32_cols(vals.T.contiguous(), bits)
    assert cols.shape == (12, 64 * bits // 32)
    assert torch.equal(unpack_int32_cols(cols, bits, 64), vals.T)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [32, 40, 100])
def test_int32_cols_match_compressed_tensors(bits, cols):
    """Our last-dim int32 stream is compressed-tensors' pack-quantized layout (unsigned codes =
    its signed values + 2**(bits-1)); checked with the library itself when it is installed."""
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits + cols)
    codes = torch.randint(0, 2 ** bits, (6, cols), generator=g, dtype=torch.int32)
    ours = pack_int32_cols(codes, bits)
    theirs = ct.pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(ours, theirs)
    back = ct.unpack_from_int32(ours, bits, torch.Size((6, cols)))
    assert torch.equal(back.to(torch.int32) + 2 ** (bits - 1), codes)
