"""The blocked, head-batched fast path equals the column-by-column reference."""

import pytest
import torch

from lowmem_boa.solvers import boa_quantize, boa_reference, gptq_quantize, gptq_reference

from helpers import random_problem


def _assert_same(fast, ref, atol):
    diff = (fast.Q - ref.Q).abs().max().item()
    assert diff <= atol, f"max |fast - reference| = {diff}"
    assert torch.allclose(fast.scale, ref.scale, atol=atol) and torch.allclose(fast.zero, ref.zero)


@pytest.mark.parametrize("act_order_col,act_order_row", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("per_head_col", [False, True])
@pytest.mark.parametrize("group_size", [None, 8, 24])
def test_boa_fast_equals_reference(act_order_col, act_order_row, per_head_col, group_size):
    n_heads, head_dim, d_col = 3, 5, 48
    W, H_col, H_row = random_problem(1, d_col=d_col, n_heads=n_heads, head_dim=head_dim,
                                     per_head_col=per_head_col)
    kw = dict(act_order_col=act_order_col, act_order_row=act_order_row, group_size=group_size)
    fast = boa_quantize(W, H_col, H_row, n_heads, 2, block_size=16, **kw)
    ref = boa_reference(W, H_col, H_row, n_heads, 2, **kw)
    _assert_same(fast, ref, 1e-10)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 8, 20, 32])
@pytest.mark.parametrize("block_size", [7, 16, 128])
def test_gptq_fast_equals_reference(act_order, group_size, block_size):
    W, H_col, _ = random_problem(2, d_col=64, n_heads=4, head_dim=6)
    fast = gptq_quantize(W, H_col, 3, act_order=act_order, group_size=group_size, block_size=block_size)
    ref = gptq_reference(W, H_col, 3, act_order=act_order, group_size=group_size)
    _assert_same(fast, ref, 1e-10)


def test_gqa_shapes_kv_heads_and_query_heads():
    """Llama-style GQA: 8 query heads share 2 KV heads. K/V solve with 2 heads whose row
    Hessians sum over their 4 query heads; Q solves with 8 heads. Nothing assumes a count."""
    d_col, head_dim = 40, 6
    Wk, H_col, Hk_row = random_problem(3, d_col=d_col, n_heads=2, head_dim=head_dim, n_q_per_kv=4)
    Wq, _, Hq_row = random_problem(4, d_col=d_col, n_heads=8, head_dim=head_dim)
    for W, H_row, nh in ((Wk, Hk_row, 2), (Wq, Hq_row, 8)):
        fast = boa_quantize(W, H_col, H_row, nh, 2, act_order_col=True, act_order_row=True, block_size=8)
        ref = boa_reference(W, H_col, H_row, nh, 2, act_order_col=True, act_order_row=True)
        assert fast.Q.shape == W.shape
        _assert_same(fast, ref, 1e-10)


def test_float32_fast_equals_reference_to_fp32_tolerance():
    W, H_col, H_row = random_problem(5, d_col=96, n_heads=4, head_dim=8, dtype=torch.float32)
    fast = boa_quantize(W, H_col, H_row, 4, 3, act_order_col=True, block_size=32)
    ref = boa_reference(W, H_col, H_row, 4, 3, act_order_col=True)
    diff = (fast.Q - ref.Q).abs()
    step = fast.scale.expand_as(W)
    # identical up to float32 rounding; a rounding tie may flip at most a handful of codes
    assert (diff <= 1e-5).float().mean() >= 0.999
    assert (diff <= step + 1e-5).all()
    fast_g = gptq_quantize(W, H_col, 3, block_size=32)
    ref_g = gptq_reference(W, H_col, 3)
    assert ((fast_g.Q - ref_g.Q).abs() <= 1e-5).float().mean() >= 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    W, H_col, H_row = random_problem(6, d_col=64, n_heads=4, head_dim=8)
    cpu = boa_quantize(W, H_col, H_row, 4, 2, act_order_col=True, act_order_row=True)
    gpu = boa_quantize(W.cuda(), H_col.cuda(), H_row.cuda(), 4, 2, act_order_col=True, act_order_row=True)
    assert gpu.Q.is_cuda
    assert torch.allclose(cpu.Q, gpu.Q.cpu(), atol=1e-8)


@pytest.mark.parametrize("group_size", [None, 8])
def test_torch_inner_loop_equals_numpy_inner_loop(monkeypatch, group_size):
    """CUDA runs the torch per-column loop; on CPU the default is numpy. Same arithmetic."""
    from lowmem_boa.solvers import optq
    W, H_col, H_row = random_problem(8, d_col=48, n_heads=3, head_dim=4, per_head_col=True)
    kw = dict(act_order_row=True, group_size=group_size, block_size=16)
    monkeypatch.setattr(optq, "DEFAULT_BACKEND", "numpy")
    a = boa_quantize(W, H_col, H_row, 3, 2, **kw)
    g_a = gptq_quantize(W, H_col[0], 2, group_size=group_size, block_size=16)
    monkeypatch.setattr(optq, "DEFAULT_BACKEND", "torch")
    b = boa_quantize(W, H_col, H_row, 3, 2, **kw)
    g_b = gptq_quantize(W, H_col[0], 2, group_size=group_size, block_size=16)
    assert torch.allclose(a.Q, b.Q, atol=1e-12) and torch.equal(a.codes, b.codes)
    assert torch.allclose(g_a.Q, g_b.Q, atol=1e-12) and torch.equal(g_a.codes, g_b.codes)


@pytest.mark.parametrize("act_order_col,act_order_row", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("per_head_col", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_follow_grids_and_refinement_fast_equal_reference(act_order_col, act_order_row, per_head_col, group_size):
    """Grids searched on the updated rows (and the scale refinement after) give the same result
    batched over heads as head by head, column by column; the first row's grid is the up-front one."""
    n_heads, head_dim, d_col = 3, 5, 48
    W, H_col, H_row = random_problem(6, d_col=d_col, n_heads=n_heads, head_dim=head_dim, per_head_col=per_head_col)
    kw = dict(act_order_col=act_order_col, act_order_row=act_order_row, group_size=group_size, follow_grids=True)
    fast = boa_quantize(W, H_col, H_row, n_heads, 2, block_size=16, **kw)
    ref = boa_reference(W, H_col, H_row, n_heads, 2, **kw)
    _assert_same(fast, ref, 1e-10)
    plain = boa_quantize(W, H_col, H_row, n_heads, 2, block_size=16, **(kw | {"follow_grids": False}))
    if group_size is None or act_order_col:     # static grids: following changes rows after the first
        assert not torch.equal(fast.scale, plain.scale)
        first = torch.arange(W.shape[0]).reshape(n_heads, head_dim)
        if act_order_row:   # the first row swept in each head is the one with the largest diag(H_row)
            first = first.gather(1, torch.argsort(torch.diagonal(H_row, dim1=-2, dim2=-1), dim=-1,
                                                  descending=True, stable=True))
        rows = first[:, 0]
        assert torch.equal(fast.scale[rows], plain.scale[rows])
    else:                                       # dynamic groups already follow the weights
        assert torch.equal(fast.scale, plain.scale) and torch.equal(fast.codes, plain.codes)
    fast_r = boa_quantize(W, H_col, H_row, n_heads, 2, block_size=16, refine_sweeps=2, **kw)
    ref_r = boa_reference(W, H_col, H_row, n_heads, 2, refine_sweeps=2, **kw)
    _assert_same(fast_r, ref_r, 1e-10)
    assert torch.equal(fast_r.codes, fast.codes)
    torch.testing.assert_close(fast_r.dequantize(), fast_r.Q, rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [None, 8])
def test_refinement_lowers_the_damped_objective_and_keeps_codes(group_size):
    from lowmem_boa.solvers import attention_loss, layer_loss
    from lowmem_boa.solvers.hessian import add_damping
    W, H_col, H_row = random_problem(7, d_col=48, n_heads=3, head_dim=5)
    Hc, Hr = H_col.clone(), H_row.clone()
    add_damping(Hc, 0.01)
    add_damping(Hr, 0.01)
    g0 = gptq_quantize(W, H_col, 2, group_size=group_size)
    g1 = gptq_quantize(W, H_col, 2, group_size=group_size, refine_sweeps=1)
    assert torch.equal(g0.codes, g1.codes) and torch.equal(g0.zero, g1.zero)
    assert layer_loss(W, g1.Q, Hc) < layer_loss(W, g0.Q, Hc)
    b0 = boa_quantize(W, H_col, H_row, 3, 2, group_size=group_size)
    b1 = boa_quantize(W, H_col, H_row, 3, 2, group_size=group_size, refine_sweeps=1)
    assert torch.equal(b0.codes, b1.codes)
    assert attention_loss(W, b1.Q, Hc, Hr) < attention_loss(W, b0.Q, Hc, Hr)
    assert b1.info["refine_sweeps"] == 1 and "refine_sweeps" not in b0.info
