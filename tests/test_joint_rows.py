"""Joint N-row BoA (``joint_rows``): the closed-form update against the brute-force minimiser of the
Kronecker objective, N=1 bit for bit Algorithm 1, the fast path against the reference, and the
objective for N up to head_dim against N=1."""

import pytest
import torch

from lowmem_boa.solvers import attention_loss, boa_quantize, boa_reference
from lowmem_boa.solvers.boa_solver import joint_row_coefficients
from lowmem_boa.solvers.hessian import add_damping, upper_cholesky_of_inverse

from helpers import random_problem


@pytest.mark.parametrize("j,n", [(0, 1), (0, 3), (2, 2), (1, 4)])
def test_closed_form_update_is_the_minimiser_with_the_block_fixed(j, n):
    """Rows before j and the block B = j..j+n-1 fixed (B at arbitrary values Q_B), the rows after
    move by -coef (W_B - Q_B) from the minimiser with only the rows before j fixed; compare with
    minimising tr(H_row D H_col D^T) over the free rows directly (full Kronecker system)."""
    g = torch.Generator().manual_seed(j * 10 + n)
    dh, C = 7, 5
    W, H_col, H_row = random_problem(3, d_col=C, n_heads=1, head_dim=dh)
    Hr = H_row[0] + 0.1 * torch.eye(dh, dtype=W.dtype)     # rank <= d_col < dh without it
    U, chol = upper_cholesky_of_inverse(Hr.unsqueeze(0).clone(), 0.0)
    assert chol.retries == 0

    def minimise(fixed_rows, fixed_values):
        """argmin over the other rows of tr(Hr D H_col D^T), D = W~ - W, given fixed rows."""
        free = [i for i in range(dh) if i not in fixed_rows]
        D_fixed = fixed_values - W[fixed_rows]
        K_ff = torch.kron(Hr[free][:, free], H_col)
        K_fx = torch.kron(Hr[free][:, fixed_rows], H_col)
        d_free = -torch.linalg.solve(K_ff, K_fx @ D_fixed.reshape(-1))
        out = W.clone()
        out[fixed_rows] = fixed_values
        out[free] = W[free] + d_free.reshape(len(free), C)
        return out

    before = list(range(j))
    W_before = minimise(before, W[before] + 0.3 * torch.randn(j, C, generator=g, dtype=W.dtype))
    Q_B = W_before[j:j + n] + 0.2 * torch.randn(n, C, generator=g, dtype=W.dtype)
    expected = minimise(list(range(j + n)), torch.cat([W_before[:j], Q_B]))
    coef = joint_row_coefficients(U, j, n)[0]
    got = W_before[j + n:] - coef @ (W_before[j:j + n] - Q_B)
    torch.testing.assert_close(got, expected[j + n:], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("act_order_row", [False, True])
@pytest.mark.parametrize("per_head_col", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_one_row_at_a_time_is_bit_identical_and_joint_rows_equal_the_reference(act_order_row, per_head_col,
                                                                               group_size):
    W, H_col, H_row = random_problem(8, d_col=48, n_heads=3, head_dim=8, per_head_col=per_head_col)
    # grouped: MinMax grids. The Hessian search over groups of 8 meets exact ties between candidates
    # (measured: best and runner-up 1.6e-16 apart), which the reference's algebraically equal but
    # differently rounded row update (H_RR^-1 H_RB instead of U) breaks the other way.
    grid = "hessian" if group_size is None else "minmax"
    kw = dict(act_order_row=act_order_row, group_size=group_size, block_size=16, grid=grid)
    old = boa_quantize(W, H_col, H_row, 3, 2, **kw)
    one = boa_quantize(W, H_col, H_row, 3, 2, joint_rows=1, **kw)
    assert torch.equal(old.Q, one.Q) and torch.equal(old.scale, one.scale)
    for n in (2, 3, 8):
        fast = boa_quantize(W, H_col, H_row, 3, 2, joint_rows=n, follow_grids=True, **kw)
        ref = boa_reference(W, H_col, H_row, 3, 2, joint_rows=n, follow_grids=True, **kw)
        assert (fast.Q - ref.Q).abs().max() <= 1e-9, n
        torch.testing.assert_close(fast.scale, ref.scale)


def test_joint_rows_objective_stays_close_to_one_row_at_a_time():
    """Measured on random attention-like problems at 2 and 3 bits: the Kronecker objective of N rows
    at once against N=1, for N up to head_dim (N = head_dim: every row of a head in one sweep, the
    rows updating nothing among themselves). The bound is what these problems show, with margin."""
    ratios = {}
    for seed in range(4):
        W, H_col, H_row = random_problem(20 + seed, d_col=64, n_heads=4, head_dim=16)
        Hc, Hr = H_col.clone(), H_row.clone()
        add_damping(Hc, 0.01)
        add_damping(Hr, 0.01)
        for bits in (2, 3):
            base = float(attention_loss(W, boa_quantize(W, H_col, H_row, 4, bits).Q, Hc, Hr))
            for n in (2, 4, 8, 16):
                q = boa_quantize(W, H_col, H_row, 4, bits, joint_rows=n).Q
                ratios.setdefault(n, []).append(float(attention_loss(W, q, Hc, Hr)) / base)
    mean = {n: sum(r) / len(r) for n, r in ratios.items()}
    # measured means: N=2 1.08, N=4 1.20, N=8 1.35, N=16 1.64 (these random problems couple the rows
    # of a head strongly; the SmolLM2 numbers are in docs/results.md)
    bound = {2: 1.15, 4: 1.3, 8: 1.5, 16: 1.8}
    assert all(mean[n] < bound[n] for n in bound), mean
    assert all(min(r) > 0.9 for r in ratios.values()), ratios


def test_joint_rows_must_be_positive():
    W, H_col, H_row = random_problem(1, d_col=16, n_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="joint_rows"):
        boa_quantize(W, H_col, H_row, 2, 2, joint_rows=0)
