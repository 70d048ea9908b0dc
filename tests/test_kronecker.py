"""The Kronecker facts BoA relies on, and BoA == sequential OBS with the full Kronecker Hessian."""

import pytest
import torch

from lowmem_boa.solvers import boa_quantize, gptq, gptq_quantize, upper_cholesky_of_inverse

from helpers import fake_quant, random_problem


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return A @ A.T + 0.1 * torch.eye(n, dtype=torch.float64)


def test_cholesky_of_kronecker_inverse_factorises():
    A, B = _spd(6, 0), _spd(4, 1)
    lhs = torch.linalg.cholesky(torch.linalg.inv(torch.kron(A, B)))
    rhs = torch.kron(torch.linalg.cholesky(torch.linalg.inv(A)), torch.linalg.cholesky(torch.linalg.inv(B)))
    assert torch.allclose(lhs, rhs, atol=1e-10, rtol=1e-8)
    # inverse of a Kronecker product, and the upper factors the solvers use
    assert torch.allclose(torch.linalg.inv(torch.kron(A, B)), torch.kron(torch.linalg.inv(A), torch.linalg.inv(B)),
                          atol=1e-10, rtol=1e-8)
    UA, _ = upper_cholesky_of_inverse(A, 0.0)
    UB, _ = upper_cholesky_of_inverse(B, 0.0)
    U_full = torch.linalg.cholesky(torch.linalg.inv(torch.kron(A, B))).T
    assert torch.allclose(torch.kron(UA, UB), U_full, atol=1e-10, rtol=1e-8)
    assert torch.allclose(UA.T @ UA, torch.linalg.inv(A), atol=1e-10, rtol=1e-8)
    assert torch.equal(UA, torch.triu(UA))


def test_vec_identity_of_the_attention_loss():
    """tr(H_row dW H_col dW^T) == vec(dW)^T (H_col (x) H_row) vec(dW) with column-major vec."""
    Hc, Hr = _spd(5, 2), _spd(3, 3)
    dW = torch.randn(3, 5, dtype=torch.float64)
    vec = dW.T.reshape(-1)  # column-major
    assert torch.allclose(vec @ torch.kron(Hc, Hr) @ vec, torch.trace(Hr @ dW @ Hc @ dW.T))


def obs_bruteforce(W_h, H_full, order, scale, zero, maxq):
    """Sequential OBS over single weights with the full Hessian, re-inverting every step.

    ``W_h`` is ``(rows, C)``, ``H_full`` is over the row-major vec (index ``r*C + c``),
    ``order`` lists variable indices, ``scale``/``zero`` are per row.
    """
    rows, C = W_h.shape
    w = W_h.reshape(-1).clone()
    Q = torch.zeros_like(w)
    remaining = list(range(w.numel()))
    for v in order:
        Hinv = torch.linalg.inv(H_full[remaining][:, remaining])
        k = remaining.index(v)
        r = v // C
        qv = fake_quant(w[v], scale[r], zero[r], maxq)
        delta = (w[v] - qv) / Hinv[k, k]
        w[remaining] -= delta * Hinv[:, k]
        Q[v] = qv
        remaining.remove(v)
    return Q.reshape(rows, C)


def _desc(diag):
    return torch.argsort(diag, descending=True, stable=True).tolist()


@pytest.mark.parametrize("act_order_col,act_order_row", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("per_head_col", [False, True])
@pytest.mark.parametrize("bits", [2, 3])
def test_boa_equals_obs_with_full_kronecker_hessian(act_order_col, act_order_row, per_head_col, bits):
    n_heads, head_dim, d_col = 2, 4, 12
    W, H_col, H_row = random_problem(7 + bits, d_col=d_col, n_heads=n_heads, head_dim=head_dim,
                                     n_tokens=64, per_head_col=per_head_col)
    res = boa_quantize(W, H_col, H_row, n_heads, bits, grid="minmax", percdamp=0.0,
                       act_order_col=act_order_col, act_order_row=act_order_row, block_size=5)
    maxq = 2 ** bits - 1
    for h in range(n_heads):
        Hc = H_col[h] if per_head_col else H_col
        Hr = H_row[h]
        rows = _desc(torch.diagonal(Hr)) if act_order_row else list(range(head_dim))
        cols = _desc(torch.diagonal(Hc)) if act_order_col else list(range(d_col))
        order = [r * d_col + c for r in rows for c in cols]
        sl = slice(h * head_dim, (h + 1) * head_dim)
        Q_bf = obs_bruteforce(W[sl], torch.kron(Hr, Hc), order, res.scale[sl, 0], res.zero[sl, 0], maxq)
        assert torch.allclose(res.Q[sl], Q_bf, atol=1e-9, rtol=0), f"head {h}"
    # and the refined row update really used the row Hessian: ignoring it changes the result
    assert not torch.allclose(res.Q, gptq(W, H_col if not per_head_col else H_col[0], bits, grid="minmax",
                                          percdamp=0.0))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_obs_with_layerwise_hessian(act_order):
    W, H_col, _ = random_problem(3, d_col=16, n_heads=3, head_dim=2, n_tokens=64)
    res = gptq_quantize(W, H_col, 2, grid="minmax", percdamp=0.0, act_order=act_order, block_size=6)
    cols = _desc(torch.diagonal(H_col)) if act_order else list(range(16))
    for r in range(W.shape[0]):
        Q_bf = obs_bruteforce(W[r:r + 1], H_col, cols, res.scale[r:r + 1, 0], res.zero[r:r + 1, 0], 3)
        assert torch.allclose(res.Q[r:r + 1], Q_bf, atol=1e-9, rtol=0)


def test_row_update_equals_total_column_update():
    """E_h U_col,h is exactly the update OPTQ applied to row j (W_before - Q), the identity
    behind skipping i = j in the row update."""
    from lowmem_boa.solvers.optq import optq_sweep
    W, H_col, _ = random_problem(11, d_col=20, n_heads=3, head_dim=1)
    U, _ = upper_cholesky_of_inverse(H_col, 0.0)
    s = (W.abs().amax(1, keepdim=True) / 2).unsqueeze(0)
    z = torch.full_like(s, 2.0)
    W3 = W.unsqueeze(0).clone()
    res = optq_sweep(W3.clone(), U.unsqueeze(0), 3, 7, s, z)
    assert torch.allclose(res.E @ U, W3 - res.Q, atol=1e-10)


@pytest.mark.parametrize("grid", ["minmax", "mmse", "hessian"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_boa_with_identity_row_hessian_equals_gptq(grid, act_order, group_size):
    n_heads, head_dim = 4, 6
    W, H_col, _ = random_problem(5, d_col=32, n_heads=n_heads, head_dim=head_dim)
    eye = torch.eye(head_dim, dtype=W.dtype).expand(n_heads, head_dim, head_dim).clone()
    Qb = boa_quantize(W, H_col, eye, n_heads, 2, grid=grid, act_order_col=act_order,
                      act_order_row=act_order, group_size=group_size, block_size=16)
    Qg = gptq_quantize(W, H_col, 2, grid=grid, act_order=act_order, group_size=group_size, block_size=16)
    assert torch.allclose(Qb.Q, Qg.Q, atol=1e-10, rtol=0)
    assert torch.equal(Qb.codes, Qg.codes)
    assert torch.allclose(Qb.scale, Qg.scale) and torch.equal(Qb.zero, Qg.zero)
