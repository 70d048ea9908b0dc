"""Bad input -> ValueError naming the problem, before any work; degenerate Hessians handled."""

import pytest
import torch

from lowmem_boa.solvers import boa, boa_quantize, find_params, gptq, gptq_quantize, rtn

from helpers import random_problem


@pytest.fixture
def prob():
    return random_problem(0, d_col=16, n_heads=2, head_dim=4)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, "3", True, None])
def test_bits_out_of_range(prob, bits):
    W, H_col, H_row = prob
    for call in (lambda: rtn(W, bits), lambda: gptq(W, H_col, bits), lambda: boa(W, H_col, H_row, 2, bits)):
        with pytest.raises(ValueError, match="bits"):
            call()


def test_heads_that_do_not_divide(prob):
    W, H_col, H_row = prob
    with pytest.raises(ValueError, match="n_heads"):
        boa(W, H_col, H_row, 3, 2)
    with pytest.raises(ValueError, match="n_heads"):
        boa(W, H_col, H_row, 0, 2)


def test_mismatched_or_non_square_hessians(prob):
    W, H_col, H_row = prob
    with pytest.raises(ValueError, match="H_col"):
        gptq(W, H_col[:8, :8], 2)
    with pytest.raises(ValueError, match="H_col"):
        gptq(W, H_col[:, :8], 2)
    with pytest.raises(ValueError, match="H_col"):
        boa(W, torch.stack([H_col] * 3), H_row, 2, 2)  # 3 per-head blocks for 2 heads
    with pytest.raises(ValueError, match="H_row"):
        boa(W, H_col, H_row[:, :3, :3], 2, 2)
    with pytest.raises(ValueError, match="H_row"):
        boa(W, H_col, H_row[:1], 2, 2)
    with pytest.raises(ValueError, match="H_row"):
        boa(W, H_col, H_row[0], 2, 2)
    asym = H_col.clone()
    asym[0, 1] += 1e3
    with pytest.raises(ValueError, match="symmetric"):
        gptq(W, asym, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_rejected(prob, bad):
    W, H_col, H_row = prob
    Wb, Hb, Rb = W.clone(), H_col.clone(), H_row.clone()
    Wb[0, 0], Hb[1, 1], Rb[0, 1, 1] = bad, bad, bad
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        gptq(Wb, H_col, 2)
    with pytest.raises(ValueError, match="H_col contains NaN or Inf"):
        gptq(W, Hb, 2)
    with pytest.raises(ValueError, match="H_row contains NaN or Inf"):
        boa(W, H_col, Rb, 2, 2)
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        rtn(Wb, 2)


def test_other_bad_arguments(prob):
    W, H_col, H_row = prob
    with pytest.raises(ValueError, match="grid"):
        gptq(W, H_col, 2, grid="kmeans")
    with pytest.raises(ValueError, match="W must be 2-D"):
        gptq(W[0], H_col, 2)
    with pytest.raises(ValueError, match="floating"):
        rtn(W.long(), 2)
    with pytest.raises(ValueError, match="group_size"):
        gptq(W, H_col, 2, group_size=-5)
    with pytest.raises(ValueError, match="percdamp"):
        gptq(W, H_col, 2, percdamp=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        gptq(W, H_col, 2, block_size=0)
    with pytest.raises(ValueError, match="sym"):
        rtn(W, 2, sym="yes")
    with pytest.raises(ValueError, match="hessian"):
        find_params(W, 2, grid="hessian")
    with pytest.raises(ValueError, match="H_col"):
        rtn(W, 2, grid="hessian")


def test_dead_channels_are_zeroed_and_solved(prob):
    W, H_col, H_row = prob
    H = H_col.clone()
    H[3, :] = 0
    H[:, 3] = 0
    res = gptq_quantize(W, H, 2)
    assert torch.isfinite(res.Q).all()
    assert torch.equal(res.Q[:, 3], torch.zeros(W.shape[0], dtype=W.dtype))
    assert res.info["dead_columns"] == 1
    Hr = H_row.clone()
    Hr[1, 2, :] = 0
    Hr[1, :, 2] = 0
    res = boa_quantize(W, H, Hr, 2, 2)
    assert torch.isfinite(res.Q).all() and res.info["dead_rows"] == 1


def test_singular_and_indefinite_hessians_get_more_damping_not_rtn(prob):
    """A failing Cholesky is retried with more damping; the result is then exactly the
    solution for the more damped Hessian, not an RTN fallback."""
    W, _, H_row = prob
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, dtype=W.dtype, generator=g)
    H_rank2 = x @ x.T  # rank 2, no zero diagonal: Cholesky fails without damping
    eye = torch.eye(16, dtype=W.dtype)
    res = gptq_quantize(W, H_rank2, 2, grid="minmax", percdamp=0.0)
    assert res.info["col_cholesky_retries"] > 0
    extra = res.info["col_extra_damping"][0]
    assert extra > 0 and torch.isfinite(res.Q).all()
    again = gptq_quantize(W, H_rank2 + extra * eye, 2, grid="minmax", percdamp=0.0)
    assert again.info["col_cholesky_retries"] == 0
    assert torch.allclose(res.Q, again.Q, atol=1e-10)
    assert not torch.allclose(res.Q, rtn(W, 2))

    H_ind = H_rank2.clone()
    H_ind.diagonal().sub_(1e-3 * H_ind.diagonal().mean())  # slightly indefinite
    res = boa_quantize(W, H_ind, H_row, 2, 2, grid="minmax", percdamp=0.0)
    assert res.info["col_cholesky_retries"] > 0 and torch.isfinite(res.Q).all()
    extra = res.info["col_extra_damping"][0]
    again = boa_quantize(W, H_ind + extra * eye, H_row, 2, 2, grid="minmax", percdamp=0.0)
    assert torch.allclose(res.Q, again.Q, atol=1e-10)


def test_overwrite_hessians_gives_the_same_result_and_leaves_copies_alone(prob):
    W, H_col, H_row = prob
    ref = boa_quantize(W, H_col, H_row, 2, 2)
    Hc, Hr = H_col.clone(), H_row.clone()
    res = boa_quantize(W, Hc, Hr, 2, 2, overwrite_hessians=True)
    assert torch.equal(ref.Q, res.Q)
    assert not torch.equal(Hc, H_col)  # damped in place
    res2 = boa_quantize(W, H_col, H_row, 2, 2)
    assert torch.equal(ref.Q, res2.Q)  # the default never touches the caller's Hessians
    g = gptq_quantize(W, H_col.clone(), 2, overwrite_hessians=True)
    assert torch.equal(g.Q, gptq_quantize(W, H_col, 2).Q)
