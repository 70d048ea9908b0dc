"""Block-level quantization options: one-pass statistics, V without a row Hessian, --search-orders,
and the scheduler's device copies (the same result on every device)."""

from __future__ import annotations

import pytest
import torch

from lowmem_boa.checkpoint import RunState
from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.pipeline import quantize_model
from lowmem_boa.scheduler import Ledger, PlanInputs, Scheduler, make_plan
from lowmem_boa.models import get_adapter
from lowmem_boa.ui import Console

from tiny_models import DATA, needs_shared, save_tiny_model, tiny_config

pytestmark = needs_shared

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LATER = ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", seed=5, n_layers=1)


def _quant(model_dir, out, **kw):
    qc = QuantConfig(model=str(model_dir), wbits=2, nsamples=6, seqlen=48, **kw)
    ro = RunOptions(output=str(out), device="cpu", data_dir=DATA, progress=False)
    report = quantize_model(qc, ro, Console(progress=False))
    return RunState(out).load_block(0, codes=True)[0], report


def test_one_pass_statistics_do_not_depend_on_the_attention_solver(llama_dir, tmp_path):
    """Without true-sequential statistics every Hessian comes from the full-precision block, so the
    out-projection and MLP results are the same whichever method quantized q/k/v; true-sequentially
    they follow the quantized attention and differ."""
    one_gptq, _ = _quant(llama_dir, tmp_path / "a", method="gptq", true_sequential=False)
    # (the same grid search for both: BoA's default coarse-to-fine search would change every later layer)
    # (both sweep columns by act-order: the 2-bit default of each)
    one_boa, _ = _quant(llama_dir, tmp_path / "b", method="boa", true_sequential=False, mlp_row_hessian=False,
                        grid_coarse=1)
    seq_gptq, _ = _quant(llama_dir, tmp_path / "c", method="gptq", true_sequential=True)
    seq_boa, _ = _quant(llama_dir, tmp_path / "d", method="boa", true_sequential=True, mlp_row_hessian=False,
                        grid_coarse=1)
    for n in ATTN:   # q/k/v see the same statistics in both modes
        assert torch.equal(one_gptq[f"{n}.weight"], seq_gptq[f"{n}.weight"]), n
        assert torch.equal(one_boa[f"{n}.weight"], seq_boa[f"{n}.weight"]), n
        assert not torch.equal(one_gptq[f"{n}.weight"], one_boa[f"{n}.weight"]), n
    for n in LATER:
        assert torch.equal(one_gptq[f"{n}.weight"], one_boa[f"{n}.weight"]), n
        assert not torch.equal(seq_gptq[f"{n}.weight"], seq_boa[f"{n}.weight"]), n
    assert not torch.equal(one_gptq["self_attn.o_proj.weight"], seq_gptq["self_attn.o_proj.weight"])


def test_v_without_row_hessian_is_gptq_per_head(llama_dir, tmp_path):
    """``--no-v-row-hessian`` solves V with an identity row Hessian: with the shared X X^T (no
    block_v) that is GPTQ on V, the same codes as the GPTQ run's V."""
    boa, _ = _quant(llama_dir, tmp_path / "a", method="boa", block_v=False, v_row_hessian=False, grid_coarse=1,
                    act_order_row=False)    # (GPTQ's orders: columns by act-order, the 2-bit default of both)
    gptq, _ = _quant(llama_dir, tmp_path / "b", method="gptq")
    with_row, _ = _quant(llama_dir, tmp_path / "c", method="boa", block_v=False)
    n = "self_attn.v_proj"
    agree = (boa[f"{n}.qcodes"] == gptq[f"{n}.qcodes"]).float().mean().item()
    assert agree > 0.99, agree   # the same arithmetic in another batch layout: last-bit ties may differ
    torch.testing.assert_close(boa[f"{n}.weight"], gptq[f"{n}.weight"], atol=0.02, rtol=0)
    assert (with_row[f"{n}.qcodes"] != gptq[f"{n}.qcodes"]).float().mean().item() > 0.05


def test_search_orders_keeps_the_best_objective(llama_dir, tmp_path):
    """Every layer keeps the combination with the lowest objective of those it tried, and the first
    layer's result is exactly the fixed-order run of the chosen combination."""
    searched, report = _quant(llama_dir, tmp_path / "s", method="boa", search_orders=True)
    layers = report["blocks"]["0"]["layers"]
    for lay in layers:
        losses = lay["info"]["order_losses"]
        assert len(losses) == (4 if lay["name"] in ATTN + ("mlp.gate_proj", "mlp.up_proj") else 2), lay["name"]
        assert losses[lay["info"]["orders"]] == min(losses.values()), lay["name"]
    first = layers[0]
    assert first["name"] == "self_attn.q_proj"
    chosen = first["info"]["orders"]
    fixed, _ = _quant(llama_dir, tmp_path / "f", method="boa", act_order_col="col" in chosen,
                      act_order_row="row" in chosen)
    assert torch.equal(searched["self_attn.q_proj.weight"], fixed["self_attn.q_proj.weight"])


def test_device_copies_leave_the_host_tensor_untouched():
    """On the CPU ``to_device`` still hands out a copy: solvers that damp it in place must not
    change a Hessian that another layer uses next (q/k/v share one)."""
    model = torch.nn.Linear(2, 2)
    sch = Scheduler(model, None, torch.device("cpu"), Ledger(torch.device("cpu"), 2 ** 30), torch.float32, False)
    H = torch.eye(3)
    d = sch.to_device(H, "H")
    d.diagonal().add_(1.0)
    assert torch.equal(H, torch.eye(3))
    sch.free("H")


def test_one_pass_plans_every_hessian_of_a_block_on_the_host():
    adapter = get_adapter(tiny_config("llama"))
    common = dict(method="boa", calibration=True, nsamples=8, seqlen=32, dtype_bytes=4, device_type="cpu")
    seq = make_plan(adapter, PlanInputs(**common, true_sequential=True), 2 ** 30, 2 ** 32)
    one = make_plan(adapter, PlanInputs(**common, true_sequential=False), 2 ** 30, 2 ** 32)
    assert one.cpu_terms["Hessians on host"] > seq.cpu_terms["Hessians on host"]


def test_default_calibration_is_128_windows_and_says_so():
    from lowmem_boa.pipeline import prepare_run
    from tiny_models import SHARED
    qc = QuantConfig(model=str(SHARED / "models" / "stories260K"), method="boa")   # seqlen 2048 -> capped to 512
    prep = prepare_run(qc, RunOptions(device="cpu", plan_only=True, progress=False))
    assert (qc.seqlen, qc.nsamples, prep.plan.inputs.nsamples) == (512, 128, 128)
    assert any("128 windows of 512 tokens (65,536 tokens" in n for n in prep.notes)
    explicit = QuantConfig(model=str(SHARED / "models" / "stories260K"), method="boa", nsamples=512)
    prep = prepare_run(explicit, RunOptions(device="cpu", plan_only=True, progress=False))
    assert explicit.nsamples == 512 and not any("calibration:" in n for n in prep.notes)


def test_cli_exposes_the_block_options():
    from lowmem_boa.cli.quant import parse
    qc, _ = parse(["--model", "m", "--output", "o"])
    assert (qc.true_sequential, qc.v_row_hessian, qc.search_orders, qc.nsamples) == (False, True, False, None)
    qc, _ = parse(["--model", "m", "--true-sequential", "--no-v-row-hessian", "--search-orders", "--nsamples", "64"])
    assert (qc.true_sequential, qc.v_row_hessian, qc.search_orders, qc.nsamples) == (True, False, True, 64)
    qc, _ = parse(["--model", "m"])
    assert (qc.mlp_row_hessian, qc.mlp_row_group, qc.fp_targets) == (None, 512, None)   # None: resolved by the run
    assert (qc.fp_alpha, qc.refine_scales, qc.follow_grids, qc.joint_rows, qc.grid_coarse) == (0.25, 1, True, None, 8)
    assert parse(["--model", "m", "--joint-rows", "auto"])[0].joint_rows is None
    assert parse(["--model", "m", "--joint-rows", "4"])[0].joint_rows == 4
    with pytest.raises(SystemExit):
        parse(["--model", "m", "--joint-rows", "many"])
    assert parse(["--model", "m", "--method", "gptq"])[0].grid_coarse == 1     # GPTQ: the full grid search
    assert parse(["--model", "m", "--grid-coarse", "4"])[0].grid_coarse == 4
    qc, _ = parse(["--model", "m", "--no-mlp-row-hessian", "--mlp-row-group", "64", "--fp-targets"])
    assert (qc.mlp_row_hessian, qc.mlp_row_group, qc.fp_targets) == (False, 64, True)
    qc, _ = parse(["--model", "m", "--no-fp-targets", "--refine-scales", "0", "--no-follow-grids", "--joint-rows", "1",
                   "--grid-coarse", "1"])
    assert (qc.fp_targets, qc.refine_scales, qc.follow_grids, qc.joint_rows, qc.grid_coarse) == (False, 0, False, 1, 1)
    assert qc.state_dict() == {k: v for k, v in qc.as_dict().items()      # the code before issue 17
                               if k not in ("fp_alpha", "follow_grids", "refine_scales", "joint_rows", "grid_coarse",
                                             "mlp_row_damp", "kquant", "kquant_types", "kquant_embedding",
                                             "residual_weights", "fp_max_shift", "block_v_targets")}
    assert parse(["--model", "m"])[0].fp_max_shift == 1.0
    assert parse(["--model", "m", "--fp-targets", "--fp-max-shift", "0"])[0].state_dict().get("fp_max_shift") is None
    assert parse(["--model", "m", "--fp-targets"])[0].state_dict()["fp_max_shift"] == 1.0    # in the run's key
    assert parse(["--model", "m", "--residual-weights"])[0].state_dict()["residual_weights"] is True
    assert parse(["--model", "m"])[0].block_v_targets is False
    assert parse(["--model", "m", "--block-v-targets"])[0].state_dict()["block_v_targets"] is True
    assert parse(["--model", "m", "--kquant", "Q3_K"])[0].kquant == "q3_k"
    assert parse(["--model", "m", "--kquant", "q3_k"])[0].state_dict()["kquant"] == "q3_k"   # in the run's key
    assert parse(["--model", "m", "--kquant", "q2_k", "--kquant-type", "mlp.down_proj=q3_k"])[0].state_dict()[
        "kquant_types"] == {"mlp.down_proj": "q3_k"}


def test_search_orders_is_planned():
    adapter = get_adapter(tiny_config("llama"))
    common = dict(method="boa", calibration=True, nsamples=8, seqlen=32, dtype_bytes=4, device_type="cpu")
    plain = make_plan(adapter, PlanInputs(**common), 2 ** 30, 2 ** 32)
    search = make_plan(adapter, PlanInputs(**common, search_orders=True), 2 ** 30, 2 ** 32)
    term = "several tries: Hessian copies + best result"
    assert term in search.phase("solve (per layer)").terms and term not in plain.phase("solve (per layer)").terms
    assert search.phase("solve (per layer)").total > plain.phase("solve (per layer)").total
    # --fp-max-shift: a layer may be solved on two targets, planned like the tries above plus the bounded target
    fpt = make_plan(adapter, PlanInputs(**common, fp_targets=True), 2 ** 30, 2 ** 32)
    bound = make_plan(adapter, PlanInputs(**common, fp_targets=True, fp_bound=True), 2 ** 30, 2 ** 32)
    terms = bound.phase("solve (per layer)").terms
    assert term in terms and "fp bound: the bounded target" in terms and term not in fpt.phase("solve (per layer)").terms



@pytest.mark.parametrize("method,mlp_rows", [("boa", None), ("boa", 8), ("gptq", None)])
def test_search_orders_counts_every_try_in_the_solve_arithmetic(method, mlp_rows):
    """Each act-order combination is one more solve, scored once (2RC^2): BoA's row-Hessian layers
    (q, k, v; gate/up with MLP row Hessians) take 4 tries, the other layers and GPTQ's take 2."""
    from lowmem_boa.scheduler.planner import PHASE_SOLVE, grid_candidates
    adapter = get_adapter(tiny_config("llama"))
    common = dict(method=method, calibration=True, nsamples=8, seqlen=32, dtype_bytes=4, device_type="cpu",
                  mlp_row_group=mlp_rows)
    plain = make_plan(adapter, PlanInputs(**common), 2 ** 30, 2 ** 32).gflop_per_block[PHASE_SOLVE]
    search = make_plan(adapter, PlanInputs(**common, search_orders=True), 2 ** 30, 2 ** 32).gflop_per_block[PHASE_SOLVE]
    grid = 2 * grid_candidates(1)
    rowed = {adapter.q_proj, adapter.k_proj, adapter.v_proj} | (set(adapter.mlp_in) if mlp_rows else set())
    one = extra = 0.0
    for name, (r, c) in adapter.linear_shapes().items():
        tries = 4 if method == "boa" and name in rowed else 2
        one += (grid + 2) * r * c * c + c ** 3
        extra += (tries - 1) * ((grid + 2) * r * c * c + c ** 3) + tries * 2 * r * c * c
    assert plain == pytest.approx(one / 1e9, rel=1e-12)
    assert search == pytest.approx((one + extra) / 1e9, rel=1e-12)


def test_fp_targets_default_on_for_one_pass_solvers_and_says_so():
    """Issue 17's corrections are the default: fp targets on for GPTQ/BoA with one-pass statistics (a
    second stream in the plan, a note), off with --true-sequential (which they cannot combine with) and
    for RTN; an explicit choice is kept."""
    from lowmem_boa.pipeline import prepare_run
    from tiny_models import SHARED
    model = str(SHARED / "models" / "stories260K")
    for kw, want in ((dict(method="boa"), True), (dict(method="gptq"), True),
                     (dict(method="gptq", true_sequential=True), False), (dict(method="rtn"), False),
                     (dict(method="boa", fp_targets=False), False)):
        qc = QuantConfig(model=model, **kw)
        prep = prepare_run(qc, RunOptions(device="cpu", plan_only=True, progress=False))
        assert qc.fp_targets is want and prep.plan.inputs.fp_targets is want, kw
        said = [n for n in prep.notes if "--fp-targets" in n]
        assert bool(said) == ("fp_targets" not in kw and kw["method"] != "rtn"), (kw, prep.notes)


def test_default_joint_rows_leave_every_head_four_row_blocks():
    """--joint-rows auto: 16 rows at once, at most a quarter of a head, so the row Hessian still updates
    rows (16 rows of SmolLM2's 64-row heads and 128-row MLP groups, of Llama-2-7B's 128); a given N stays."""
    from lowmem_boa.config import joint_rows_for
    assert [joint_rows_for(d, None) for d in (1, 4, 8, 32, 64, 128, 256)] == [1, 1, 2, 8, 16, 16, 16]
    assert joint_rows_for(8, 16) == 16 and joint_rows_for(128, 1) == 1
