"""Scale refinement (solvers/refine.py) against the brute-force least-squares optimum of the scales."""

import pytest
import torch

from lowmem_boa.solvers import attention_loss, boa_quantize, gptq_quantize, layer_loss
from lowmem_boa.solvers.grid import dequantize, expand_params
from lowmem_boa.solvers.refine import refine_scales


def _spd(n, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, 3 * n, generator=g, dtype=torch.float64)
    return X @ X.transpose(-1, -2) / (3 * n) + 0.05 * torch.eye(n, dtype=torch.float64)


def _objective(W, Q, H_col, H_row):
    if H_row is None:
        return float(layer_loss(W, Q, H_col))
    return float(attention_loss(W, Q, H_col, H_row))


def _brute_force_scales(W, codes, zero, group_size, H_col, H_row):
    """Global minimiser over all R*G scales: f(s) = (w - B s)^T K (w - B s) with the full
    (block-diagonal over heads) Kronecker Hessian K, solved by least squares."""
    R, C = W.shape
    G = zero.shape[1]
    U = codes.double() - expand_params(zero.double(), group_size, C)
    nh = 1 if H_row is None else H_row.shape[0]
    dh = R // nh
    Hr = torch.eye(R, dtype=torch.float64).reshape(1, R, R) if H_row is None else H_row
    K = torch.zeros(R * C, R * C, dtype=torch.float64)      # row-major vec: index r*C + c
    for h in range(nh):
        Hc = H_col if H_col.dim() == 2 else H_col[h]
        rows = slice(h * dh, (h + 1) * dh) if H_row is not None else slice(0, R)
        n = dh if H_row is not None else R
        idx = torch.arange(rows.start * C, rows.start * C + n * C)
        K[idx[:, None], idx[None, :]] = torch.kron(Hr[h if H_row is not None else 0], Hc)
    B = torch.zeros(R * C, R * G, dtype=torch.float64)
    gidx = torch.arange(C) // (group_size or C)
    for r in range(R):
        for c in range(C):
            B[r * C + c, r * G + gidx[c]] = U[r, c]
    w = W.double().reshape(-1)
    keep = B.abs().sum(0) > 0
    Bk = B[:, keep]
    sk = torch.linalg.solve(Bk.T @ K @ Bk, Bk.T @ K @ w)
    return sk, keep


@pytest.mark.parametrize("group_size", [None, 4])
def test_gptq_one_sweep_is_the_global_optimum(group_size):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 12, generator=g, dtype=torch.float64)
    H = _spd(12, seed=2)
    res = gptq_quantize(W, H.clone(), 2, group_size=group_size)
    s = refine_scales(W, res.codes, res.scale, res.zero, group_size, H, None, sweeps=1)
    ref, keep = _brute_force_scales(W, res.codes, res.zero, group_size, H, None)
    torch.testing.assert_close(s.reshape(-1)[keep], ref, rtol=1e-9, atol=1e-12)
    Q0 = dequantize(res.codes, res.scale, res.zero, group_size)
    Q1 = dequantize(res.codes, s, res.zero, group_size)
    assert _objective(W, Q1, H, None) < _objective(W, Q0, H, None)


@pytest.mark.parametrize("group_size,per_head_col", [(None, False), (4, False), (None, True), (4, True)])
def test_boa_sweeps_never_increase_and_converge_to_the_global_optimum(group_size, per_head_col):
    g = torch.Generator().manual_seed(3)
    nh, dh, C = 2, 3, 12
    W = torch.randn(nh * dh, C, generator=g, dtype=torch.float64)
    H_col = _spd(C, (nh,), seed=4) if per_head_col else _spd(C, seed=4)
    H_row = _spd(dh, (nh,), seed=5)
    res = boa_quantize(W, H_col.clone(), H_row.clone(), nh, 2, group_size=group_size)
    f = [_objective(W, res.Q, H_col, H_row)]
    s = res.scale
    for _ in range(60):
        s = refine_scales(W, res.codes, s, res.zero, group_size, H_col, H_row, sweeps=1)
        f.append(_objective(W, dequantize(res.codes, s, res.zero, group_size), H_col, H_row))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(f, f[1:])), f
    assert f[1] < f[0]
    ref, keep = _brute_force_scales(W, res.codes, res.zero, group_size, H_col, H_row)
    torch.testing.assert_close(s.reshape(-1)[keep], ref, rtol=1e-6, atol=1e-9)
    # several sweeps in one call are the same as one call per sweep
    s3 = refine_scales(W, res.codes, res.scale, res.zero, group_size, H_col, H_row, sweeps=3)
    s_seq = res.scale
    for _ in range(3):
        s_seq = refine_scales(W, res.codes, s_seq, res.zero, group_size, H_col, H_row, sweeps=1)
    torch.testing.assert_close(s3, s_seq)


def test_rows_whose_codes_all_equal_the_zero_point_keep_their_scale():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(4, 8, generator=g, dtype=torch.float64)
    H_col, H_row = _spd(8, seed=7), _spd(2, (2,), seed=8)
    res = boa_quantize(W, H_col.clone(), H_row.clone(), 2, 2, group_size=4)
    codes = res.codes.clone()
    codes[1] = res.zero[1].repeat_interleave(4).to(codes.dtype)     # row 1: every code at its zero point
    codes[2, :4] = res.zero[2, 0].to(codes.dtype)                    # row 2: its first group only
    s = refine_scales(W, codes, res.scale, res.zero, 4, H_col, H_row, sweeps=2)
    assert torch.isfinite(s).all()
    assert torch.equal(s[1], res.scale[1]) and s[2, 0] == res.scale[2, 0]
    assert (s > 0).all()
    f0 = _objective(W, dequantize(codes, res.scale, res.zero, 4), H_col, H_row)
    assert _objective(W, dequantize(codes, s, res.zero, 4), H_col, H_row) <= f0
    s_g = refine_scales(W, codes, res.scale, res.zero, 4, H_col, None, sweeps=1)   # GPTQ path too
    assert torch.isfinite(s_g).all() and torch.equal(s_g[1], res.scale[1])


def test_zero_sweeps_change_nothing_and_float32_follows_float64():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(6, 16, generator=g, dtype=torch.float64)
    H_col, H_row = _spd(16, seed=10), _spd(3, (2,), seed=11)
    res = boa_quantize(W, H_col.clone(), H_row.clone(), 2, 3)
    assert torch.equal(refine_scales(W, res.codes, res.scale, res.zero, None, H_col, H_row, sweeps=0), res.scale)
    s64 = refine_scales(W, res.codes, res.scale, res.zero, None, H_col, H_row, sweeps=1)
    s32 = refine_scales(W.float(), res.codes, res.scale.float(), res.zero.float(), None, H_col.float(),
                        H_row.float(), sweeps=1)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32.double(), s64, rtol=1e-4, atol=1e-6)
