"""``--fp-targets`` (asymmetric calibration): the weight correction's algebra against brute force,
and the pipeline's second activation stream (block 0 unchanged, later blocks corrected, resume
bit-identical, planned)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowmem_boa.checkpoint import RunState
from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.models import get_adapter
from lowmem_boa.pipeline import quantize_model
from lowmem_boa.scheduler import PlanInputs, make_plan
from lowmem_boa.solvers.target import fp_target_weight
from lowmem_boa.ui import Console

from tiny_models import DATA, needs_shared, save_tiny_model, tiny_config


def _problem(seed=0, R=5, D=7, T=40, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(D, T, generator=g, dtype=torch.float64)            # fp model's layer input
    Xq = X + noise * torch.randn(D, T, generator=g, dtype=torch.float64)   # quantized model's
    W = torch.randn(R, D, generator=g, dtype=torch.float64)
    return W, X, Xq, (Xq @ Xq.T) / T, (X @ Xq.T) / T


def test_symmetric_objective_on_the_corrected_weight_equals_the_asymmetric_one():
    """Without damping ``||Q X~ - W X||^2 - ||(Q - W') X~||^2`` is the same for every Q."""
    W, X, Xq, H, C = _problem()
    Wp = fp_target_weight(W, H, C, percdamp=0.0)
    g = torch.Generator().manual_seed(1)
    gaps = []
    for _ in range(4):
        Q = torch.randn(W.shape, generator=g, dtype=torch.float64)
        asym = ((Q @ Xq - W @ X) ** 2).sum()
        sym = (((Q - Wp) @ Xq) ** 2).sum()
        gaps.append(float(asym - sym))
    assert max(gaps) - min(gaps) < 1e-8 * abs(gaps[0]) + 1e-9, gaps


def test_damped_correction_is_the_ridge_solution_towards_the_original_weight():
    """With ``lam = percdamp * mean diag(H)``, W' minimises ``mean||Q X~ - W X||^2 + lam ||Q - W||^2``:
    the gradient vanishes there."""
    W, X, Xq, H, C = _problem(seed=2)
    T = X.shape[1]
    p = 0.05
    Wp = fp_target_weight(W, H, C, percdamp=p)
    lam = p * torch.diagonal(H).mean()
    grad = (Wp @ Xq - W @ X) @ Xq.T / T + lam * (Wp - W)
    assert float(grad.abs().max()) < 1e-10


@pytest.mark.parametrize("alpha", [0.25, 0.6])
def test_alpha_minimises_the_weighted_objective_and_interpolates(alpha):
    """``W'(alpha)`` zeroes the gradient of ``alpha mean||Q X~ - W X||^2 + (1 - alpha) mean||(Q - W) X~||^2
    + lam ||Q - W||^2``; it lies ``alpha`` of the way from ``W`` to ``W'(1)``, and alpha = 1 is the default."""
    W, X, Xq, H, C = _problem(seed=5)
    T = X.shape[1]
    p = 0.05
    Wa = fp_target_weight(W, H, C, percdamp=p, alpha=alpha)
    lam = p * torch.diagonal(H).mean()
    grad = (alpha * (Wa @ Xq - W @ X) @ Xq.T + (1 - alpha) * ((Wa - W) @ Xq) @ Xq.T) / T + lam * (Wa - W)
    assert float(grad.abs().max()) < 1e-10
    W1 = fp_target_weight(W, H, C, percdamp=p)
    torch.testing.assert_close(Wa, W + alpha * (W1 - W), rtol=1e-12, atol=1e-12)
    assert torch.equal(fp_target_weight(W, H, C, percdamp=p, alpha=1.0), W1)


def test_unperturbed_input_leaves_the_weight_unchanged_and_dead_channels_keep_their_column():
    W, X, _, H, _ = _problem(seed=3)
    assert torch.equal(fp_target_weight(W, H, H.clone()), W)
    W, X, Xq, H, C = _problem(seed=4)
    H[2, :], H[:, 2], C[2, :], C[:, 2] = 0, 0, 0, 0   # channel 2 never active in either model
    Wp = fp_target_weight(W, H, C, percdamp=0.01)
    assert torch.equal(Wp[:, 2], W[:, 2])
    assert torch.isfinite(Wp).all() and not torch.allclose(Wp, W)


def test_max_shift_bounds_a_wild_correction_by_scaling_alpha_and_leaves_a_tame_one_bit_identical():
    """A drifted stream (X~ nearly unrelated to X, H ill-conditioned) makes ``alpha ||Z||`` several times
    ``||W||``; ``max_shift`` scales alpha down so that ``||W' - W|| = max_shift ||W||`` exactly, and the
    result is still the minimiser of the weighted objective, with the applied alpha. Below the bound
    the result is the unbounded one bit for bit."""
    g = torch.Generator().manual_seed(7)
    R, D, T = 6, 8, 30
    X = torch.randn(D, T, generator=g, dtype=torch.float64)
    Xq = torch.randn(D, T, generator=g, dtype=torch.float64) * torch.logspace(0, -3, D, dtype=torch.float64)[:, None]
    W = torch.randn(R, D, generator=g, dtype=torch.float64)
    H, C = Xq @ Xq.T / T, X @ Xq.T / T
    alpha, p = 0.25, 0.01
    free, capped = {}, {}
    Wf = fp_target_weight(W, H, C, percdamp=p, alpha=alpha, info=free)
    assert free["fp_shift"] > 2 * alpha and free["fp_alpha_applied"] == alpha
    torch.testing.assert_close(torch.linalg.matrix_norm(Wf - W) / torch.linalg.matrix_norm(W),
                               torch.tensor(free["fp_shift"], dtype=torch.float64), rtol=1e-12, atol=0)
    Wc = fp_target_weight(W, H, C, percdamp=p, alpha=alpha, max_shift=alpha, info=capped)
    assert capped["fp_shift"] == free["fp_shift"] and capped["fp_alpha_applied"] < alpha
    rel = float(torch.linalg.matrix_norm(Wc - W) / torch.linalg.matrix_norm(W))
    assert abs(rel - alpha) < 1e-12
    a = capped["fp_alpha_applied"]
    torch.testing.assert_close(Wc, fp_target_weight(W, H, C, percdamp=p, alpha=a), rtol=1e-12, atol=1e-12)
    lam = p * torch.diagonal(H).mean()
    grad = (a * (Wc @ Xq - W @ X) @ Xq.T + (1 - a) * ((Wc - W) @ Xq) @ Xq.T) / T + lam * (Wc - W)
    assert float(grad.abs().max()) < 1e-10
    # a tame correction (small drift) is below the bound: unchanged, bit for bit
    W, X, Xq, H, C = _problem(seed=8, noise=0.05)
    tame = {}
    Wt = fp_target_weight(W, H, C, percdamp=p, alpha=alpha, max_shift=alpha, info=tame)
    assert tame["fp_shift"] < alpha and tame["fp_alpha_applied"] == alpha
    assert torch.equal(Wt, fp_target_weight(W, H, C, percdamp=p, alpha=alpha))
    assert torch.equal(fp_target_weight(W, H, H.clone(), max_shift=0.1), W)     # no correction: nothing to bound


def test_fp_targets_are_planned():
    adapter = get_adapter(tiny_config("llama"))
    common = dict(method="boa", calibration=True, nsamples=8, seqlen=32, dtype_bytes=4, device_type="cpu")
    plain = make_plan(adapter, PlanInputs(**common), 2 ** 30, 2 ** 32)
    fpt = make_plan(adapter, PlanInputs(**common, fp_targets=True), 2 ** 30, 2 ** 32)
    assert fpt.cpu_terms["activations (in + out)"] == 2 * plain.cpu_terms["activations (in + out)"]
    assert fpt.cpu_terms["Hessians on host"] > plain.cpu_terms["Hessians on host"]
    # one pass: the fp stream's chunk runs through the whole block inside the statistics phase
    stats = "block statistics (one forward)"
    assert "C partial" in fpt.phase(stats).terms and "fp-stream input + output chunk" in fpt.phase(stats).terms
    assert fpt.phase(stats).total > plain.phase(stats).total
    assert fpt.gflop_per_block[stats] > plain.gflop_per_block[stats] + plain.gflop_per_block["propagate (block forward)"]


def test_fp_targets_refuse_what_they_cannot_do():
    for kw in (dict(method="rtn"), dict(method="boa", true_sequential=True)):
        with pytest.raises(ValueError, match="--fp-targets"):
            QuantConfig(model="m", fp_targets=True, **kw).validate()


def _quant(model_dir, out, **kw):
    qc = QuantConfig(model=str(model_dir), wbits=2, nsamples=6, seqlen=48, **kw)
    ro = RunOptions(output=str(out), device="cpu", data_dir=DATA, progress=False)
    return quantize_model(qc, ro, Console(progress=False))


@needs_shared
@pytest.mark.parametrize("method", ["gptq", "boa"])
def test_pipeline_fp_targets_correct_later_blocks_and_resume_bit_identically(tmp_path, method):
    """Block 0 sees the same input in both models, so its result is exactly the plain run's; later
    blocks are fitted to the fp model and differ. A resumed run replays both streams: dropping block 2
    and rerunning gives the same checkpoint bit for bit."""
    model = save_tiny_model("llama", tmp_path / "m", seed=5, n_layers=3)
    plain, fpt = tmp_path / "plain", tmp_path / "fpt"
    _quant(model, plain, method=method, fp_targets=False)
    report = _quant(model, fpt, method=method, fp_targets=True)
    assert "block statistics (one forward)" in report["blocks"]["1"]["phase_seconds"]
    # each corrected layer reports its correction's size; one beyond --fp-max-shift (1: 0.25 ||W||) was
    # solved on both targets and kept the lower objective
    for i in ("1", "2"):
        for layer in report["blocks"][i]["layers"]:
            info = layer["info"]
            assert info["fp_shift"] > 0 and ("fp_bounded_kept" in info) == (info["fp_shift"] > 0.25), layer
    assert all(layer["info"]["fp_shift"] == 0 for layer in report["blocks"]["0"]["layers"])
    a0, b0 = RunState(plain).load_block(0)[0], RunState(fpt).load_block(0)[0]
    for k in a0:
        assert torch.equal(a0[k], b0[k]), k
    a2, b2 = RunState(plain).load_block(2)[0], RunState(fpt).load_block(2)[0]
    assert not torch.equal(a2["mlp.down_proj.weight"], b2["mlp.down_proj.weight"])

    ref = load_file(fpt / "model.safetensors")
    blk = fpt / "quant_state" / "block_0002.safetensors"
    blk.write_bytes(blk.read_bytes()[:100])
    _quant(model, fpt, method=method, fp_targets=True)
    assert json.loads((fpt / "quant_report.json").read_text())["resumed_from_block"] == 2
    again = load_file(fpt / "model.safetensors")
    for k in ref:
        assert torch.equal(ref[k], again[k]), k


@needs_shared
@pytest.mark.parametrize("method", ["gptq", "boa"])
def test_pipeline_bounded_target_is_a_second_candidate_kept_only_when_its_objective_is_lower(tmp_path, method):
    """--fp-max-shift solves a layer whose correction exceeds the bound on both targets and keeps the one
    with the lower objective against the full correction; a bound no layer reaches changes nothing (the
    checkpoint equals an unbounded run's bit for bit)."""
    model = save_tiny_model("llama", tmp_path / "m", seed=5, n_layers=3)
    runs = {}
    for label, shift in (("free", 0.0), ("high", 1e6), ("tiny", 1e-4)):
        report = _quant(model, tmp_path / label, method=method, fp_targets=True, fp_max_shift=shift)
        runs[label] = (report, load_file(tmp_path / label / "model.safetensors"))
    for k, v in runs["free"][1].items():
        assert torch.equal(v, runs["high"][1][k]), k
    kept = []
    for i in ("1", "2"):
        for layer in runs["tiny"][0]["blocks"][i]["layers"]:
            info = layer["info"]
            assert info["fp_bounded_kept"] == (info["fp_loss_bounded"] < info["fp_loss_full"]), layer
            assert 0 < info["fp_alpha_bounded"] < 0.25, layer
            kept.append(info["fp_bounded_kept"])
        assert all("fp_bounded_kept" not in lay["info"] for lay in runs["free"][0]["blocks"][i]["layers"])
    # the full target's solve is the unbounded run's: where it always wins, the checkpoints are equal
    differs = [k for k, v in runs["free"][1].items() if not torch.equal(v, runs["tiny"][1][k])]
    assert bool(differs) == any(kept), (kept, differs)
    assert not any(".layers.0." in k for k in differs)      # block 0: no correction (C = H), one target


@needs_shared
@pytest.mark.parametrize("method", ["boa"])      # GPTQ's path: the same options minus two (solver tests)
def test_pipeline_alpha_follow_and_refinement_resume_bit_identically(tmp_path, method):
    """alpha-scaled fp targets, grids that follow the weights, refined scales, joint rows: a run whose last
    block file is damaged resumes to the same checkpoint bit for bit (each option's effect is tested
    on the solvers: tests/test_refine.py, test_joint_rows.py, test_fast_vs_reference.py)."""
    model = save_tiny_model("llama", tmp_path / "m", seed=6, n_layers=3)
    boa = method == "boa"
    kw = dict(method=method, fp_targets=True, fp_alpha=0.25, follow_grids=boa, refine_scales=1,
              joint_rows=4 if boa else 1)
    out = tmp_path / "q"
    _quant(model, out, **kw)
    ref = load_file(out / "model.safetensors")
    blk = out / "quant_state" / "block_0002.safetensors"
    blk.write_bytes(blk.read_bytes()[:100])
    _quant(model, out, **kw)
    assert json.loads((out / "quant_report.json").read_text())["resumed_from_block"] == 2
    again = load_file(out / "model.safetensors")
    for k in ref:
        assert torch.equal(ref[k], again[k]), k
    # the options reach the solver: the same run without them (plain --fp-targets) differs
    plain = tmp_path / "plain"
    _quant(model, plain, method=method, fp_targets=True)
    name = "model.layers.2.self_attn.q_proj.weight"
    assert not torch.equal(load_file(plain / "model.safetensors")[name], ref[name])
