"""``--block-v-targets``: V's fp target under block_v from its own attention-weighted statistics.

With ``--fp-targets`` and block_v, V is quantized on the per-KV-head Hessian ``H_j = sum_h X~ A_h^T A_h
X~^T`` but its target was corrected with q/k/v's plain ``(H, C)``. The option corrects each head with
``C_j = sum_h X_fp A_fp,h^T A_h X~^T`` (the fp stream through its own attention maps), so that the
target is the minimiser of the objective the solver then sees: ``sum_h ||W_j X_fp A_fp,h^T - Q_j X~
A_h^T||^2`` (plus the ridge towards ``W_j``). Checked here: the per-head correction against the
objective's gradient, one head against the plain path bit for bit, the bound over all heads, the
plan, and the pipeline (block 0 unchanged, later V changed, resume bit-identical).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.models import get_adapter
from lowmem_boa.pipeline import quantize_model
from lowmem_boa.scheduler import PlanInputs, make_plan
from lowmem_boa.solvers.target import fp_target_weight
from lowmem_boa.ui import Console

from tiny_models import DATA, needs_shared, save_tiny_model, tiny_config


def _heads_problem(seed=0, n_kv=2, n_rep=2, r=3, D=6, T=30, noise=0.3):
    """Per KV head j: rows W_j, the streams X (fp) and X~, random causal row-stochastic maps per query head."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(D, T, generator=g, dtype=torch.float64)
    Xq = X + noise * torch.randn(D, T, generator=g, dtype=torch.float64)

    def maps():
        s = torch.randn(T, T, generator=g, dtype=torch.float64).masked_fill(
            torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1)
    A = [[(maps(), maps()) for _ in range(n_rep)] for _ in range(n_kv)]     # (A_fp, A~) per query head
    W = torch.randn(n_kv * r, D, generator=g, dtype=torch.float64)
    H = torch.stack([sum(Xq @ a.T @ a @ Xq.T for _, a in A[j]) / T for j in range(n_kv)])
    C = torch.stack([sum(X @ af.T @ a @ Xq.T for af, a in A[j]) / T for j in range(n_kv)])
    return W, X, Xq, A, H, C


def test_per_head_target_zeroes_each_heads_weighted_ridge_gradient():
    """``W'_j`` minimises ``alpha mean sum_h ||W_j X A_fp,h^T - Q X~ A_h^T||^2 + (1 - alpha) mean sum_h
    ||(Q - W_j) X~ A_h^T||^2 + lam_j ||Q - W_j||^2`` (``lam_j = percdamp * mean diag(H_j)``)."""
    W, X, Xq, A, H, C = _heads_problem()
    T, r = X.shape[1], W.shape[0] // H.shape[0]
    p, alpha = 0.05, 0.4
    Wp = fp_target_weight(W, H, C, percdamp=p, alpha=alpha)
    for j in range(H.shape[0]):
        Wj, Qj = W[j * r:(j + 1) * r], Wp[j * r:(j + 1) * r]
        lam = p * torch.diagonal(H[j]).mean()
        grad = lam * (Qj - Wj)
        for af, a in A[j]:
            Yq = Xq @ a.T
            grad = grad + (alpha * (Qj @ Yq - Wj @ X @ af.T) + (1 - alpha) * (Qj - Wj) @ Yq) @ Yq.T / T
        assert float(grad.abs().max()) < 1e-10, j
    # the plain (shared) correction is not this optimum: the option changes V's target
    assert not torch.allclose(fp_target_weight(W, H.mean(0), C.mean(0), percdamp=p, alpha=alpha), Wp, atol=1e-3)


def test_one_head_is_the_plain_path_bit_for_bit_and_the_bound_covers_all_heads():
    W, X, Xq, A, H, C = _heads_problem(seed=1)
    r = W.shape[0] // H.shape[0]
    for dt in (torch.float32, torch.float64):
        Wd = W[:r].to(dt)
        assert torch.equal(fp_target_weight(Wd, H[:1].to(dt), C[:1].to(dt), 0.01, 0.25),
                           fp_target_weight(Wd, H[0].to(dt), C[0].to(dt), 0.01, 0.25))
    free, info = {}, {}
    Wp = fp_target_weight(W, H, C, 0.01, 1.0, None, free)
    bound = 0.5 * free["fp_shift"]
    Wb = fp_target_weight(W, H, C, 0.01, 1.0, bound, info)
    assert info["fp_shift"] == free["fp_shift"] and info["fp_alpha_applied"] == pytest.approx(0.5)
    assert float(torch.linalg.matrix_norm(Wb - W)) == pytest.approx(bound * float(torch.linalg.matrix_norm(W)))
    assert torch.allclose(Wb - W, 0.5 * (Wp - W), atol=1e-12)     # one alpha for all heads
    with pytest.raises(ValueError, match="heads"):
        fp_target_weight(W[:-1], H, C)


def test_block_v_targets_are_planned():
    adapter = get_adapter(tiny_config("llama"))
    common = dict(method="boa", calibration=True, nsamples=8, seqlen=32, dtype_bytes=4, device_type="cpu",
                  fp_targets=True)
    plain = make_plan(adapter, PlanInputs(**common), 2 ** 30, 2 ** 32)
    cross = make_plan(adapter, PlanInputs(**common, block_v_targets=True), 2 ** 30, 2 ** 32)
    bv = "block_v statistics"
    assert cross.phase(bv).total > plain.phase(bv).total
    assert cross.gflop_per_block[bv] == pytest.approx(2 * plain.gflop_per_block[bv])
    assert cross.host_by_phase[bv] > plain.host_by_phase[bv]


def _quant(model_dir, out, **kw):
    qc = QuantConfig(model=str(model_dir), method="boa", wbits=2, nsamples=6, seqlen=48, fp_targets=True,
                     **{"block_v": True, **kw})
    ro = RunOptions(output=str(out), device="cpu", data_dir=DATA, progress=False)
    return quantize_model(qc, ro, Console(progress=False))


@needs_shared
def test_pipeline_block_v_targets_change_only_v_after_block_0_and_resume_bit_identically(tmp_path):
    """Block 0 sees one stream (``C_j = H_j``: no correction), so it equals the default run bit for bit;
    later blocks' V is retargeted (its own correction size reported) and differs; a damaged last block
    resumes to the same checkpoint."""
    model = save_tiny_model("llama", tmp_path / "m", seed=7, n_layers=3)
    base, cross = tmp_path / "base", tmp_path / "cross"
    r_base = _quant(model, base)
    r_cross = _quant(model, cross, block_v_targets=True)
    a, b = load_file(base / "model.safetensors"), load_file(cross / "model.safetensors")
    for k in a:
        if ".layers.0." in k or "layers" not in k:
            assert torch.equal(a[k], b[k]), k
    v = "model.layers.2.self_attn.v_proj.weight"
    assert not torch.equal(a[v], b[v])

    def v_shift(report, i):
        return next(lay["info"]["fp_shift"] for lay in report["blocks"][i]["layers"] if lay["name"].endswith("v_proj"))
    assert v_shift(r_cross, "0") == 0 and v_shift(r_cross, "2") > 0
    assert v_shift(r_cross, "2") != v_shift(r_base, "2")
    # q/k of block 1 do not depend on the option (V is solved after them)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a[q], b[q])

    blk = cross / "quant_state" / "block_0002.safetensors"
    blk.write_bytes(blk.read_bytes()[:100])
    _quant(model, cross, block_v_targets=True)
    assert json.loads((cross / "quant_report.json").read_text())["resumed_from_block"] == 2
    again = load_file(cross / "model.safetensors")
    for k in b:
        assert torch.equal(b[k], again[k]), k
