"""``--mlp-row-hessian``: the MLP-input layers' row Hessians against brute force, the adapters'
gains against the model's own forward, and the block-diagonal grouping."""

from __future__ import annotations

import pytest
import torch

from lowmem_boa.forward import capture_input
from lowmem_boa.models import get_adapter
from lowmem_boa.scheduler import PlanInputs, make_plan
from lowmem_boa.stats import gain_grams, mlp_row_group, mlp_row_hessian

from tiny_models import needs_shared, save_tiny_model, tiny_config, tiny_model
from test_stats import _block_inputs


def test_one_token_row_hessian_is_exact():
    """For one token ``||W_out (m * dW x)||^2 = tr(dW x x^T dW^T H_row)``, H_row = (W_out^T W_out) * m m^T."""
    g = torch.Generator().manual_seed(0)
    d, I, D = 6, 10, 7
    W_out = torch.randn(d, I, generator=g, dtype=torch.float64)
    m = torch.randn(1, I, generator=g, dtype=torch.float64)
    dW = torch.randn(I, D, generator=g, dtype=torch.float64)
    x = torch.randn(D, 1, generator=g, dtype=torch.float64)
    H_row = mlp_row_hessian(gain_grams(m, I), W_out)[0]
    lhs = ((W_out @ (m.T * (dW @ x))) ** 2).sum()
    rhs = torch.trace(dW @ x @ x.T @ dW.T @ H_row)
    assert torch.allclose(lhs, rhs.to(lhs.dtype), rtol=1e-10)


def test_groups_are_the_diagonal_blocks_of_the_full_row_hessian():
    g = torch.Generator().manual_seed(1)
    T, I, d, grp = 9, 12, 5, 4
    m = torch.randn(T, I, generator=g)
    W_out = torch.randn(d, I, generator=g)
    full = mlp_row_hessian(gain_grams(m, I), W_out)[0]
    blocks = mlp_row_hessian(gain_grams(m, grp), W_out)
    assert blocks.shape == (I // grp, grp, grp)
    for b in range(I // grp):
        sl = slice(b * grp, (b + 1) * grp)
        torch.testing.assert_close(blocks[b], full[sl, sl], rtol=1e-5, atol=1e-5)
    assert [mlp_row_group(I, n) for I, n in ((172, 128), (11008, 128), (64, 128), (13, 8), (18944, 128))] == \
        [86, 128, 64, 1, 128]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_gains_are_the_mlp_output_layers_input_sensitivity(family):
    """Perturbing one MLP-input layer's weight by ``dW`` changes the MLP-output layer's input by
    ``m * (dW x)`` to first order (exactly, for ``up``)."""
    model = tiny_model(family, seed=2)
    adapter = get_adapter(model.config)
    ids = torch.randint(2, 8192, (2, 12), generator=torch.Generator().manual_seed(2))
    block, h, kw = _block_inputs(model, ids)
    with torch.no_grad():
        x = capture_input(block, adapter.mlp_in[0], h, kw)
        gains = adapter.mlp_gains(block, x)
        assert set(gains) == set(adapter.mlp_in)
        h0 = capture_input(block, adapter.mlp_out, h, kw).double()
        for name in adapter.mlp_in:
            lin = block.get_submodule(name)
            dW = 1e-4 * torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(3))
            lin.weight += dW
            h1 = capture_input(block, adapter.mlp_out, h, kw).double()
            lin.weight -= dW
            pred = gains[name].double() * (x.reshape(-1, x.shape[-1]).double() @ dW.double().T)
            err = (h1.reshape(pred.shape) - h0.reshape(pred.shape) - pred).norm() / pred.norm()
            assert err < 2e-2, (name, float(err))


def test_mlp_row_hessian_is_planned():
    adapter = get_adapter(tiny_config("llama"))
    common = dict(method="boa", calibration=True, nsamples=8, seqlen=32, dtype_bytes=4, device_type="cpu")
    plain = make_plan(adapter, PlanInputs(**common), 2 ** 30, 2 ** 32)
    rows = make_plan(adapter, PlanInputs(**common, mlp_row_group=16), 2 ** 30, 2 ** 32)
    for seq, phase in ((False, "block statistics (one forward)"), (True, "MLP-input statistics")):
        if seq:   # the true-sequential plan has the per-group phases
            plain = make_plan(adapter, PlanInputs(**common, true_sequential=True), 2 ** 30, 2 ** 32)
            rows = make_plan(adapter, PlanInputs(**common, mlp_row_group=16, true_sequential=True), 2 ** 30, 2 ** 32)
        assert "E[m m^T] partial" in rows.phase(phase).terms
        if not seq:   # one pass holds every set at once (true-sequential: the largest later set, here H of down)
            assert rows.cpu_terms["Hessians on host"] > plain.cpu_terms["Hessians on host"]
        assert rows.gflop_per_block[phase] > plain.gflop_per_block[phase]


def _quant(model_dir, out, **kw):
    from lowmem_boa.checkpoint import RunState
    from lowmem_boa.config import QuantConfig, RunOptions
    from lowmem_boa.pipeline import quantize_model
    from lowmem_boa.ui import Console
    from tiny_models import DATA
    qc = QuantConfig(model=str(model_dir), wbits=2, nsamples=6, seqlen=48, **kw)
    quantize_model(qc, RunOptions(output=str(out), device="cpu", data_dir=DATA, progress=False), Console(progress=False))
    return RunState(out).load_block(0, codes=True)[0]


@needs_shared
def test_pipeline_mlp_rows_change_only_the_mlp_input_layers(tmp_path):
    """One-pass statistics: only gate/up see the row Hessian; everything else is the plain BoA run's.
    With 1-row groups the row Hessian is diagonal, the rows decouple and gate/up are GPTQ's codes."""
    model = save_tiny_model("llama", tmp_path / "m", seed=5, n_layers=1)
    plain = _quant(model, tmp_path / "a", method="boa", mlp_row_hessian=False)
    rows = _quant(model, tmp_path / "b", method="boa", mlp_row_hessian=True)
    diag = _quant(model, tmp_path / "c", method="boa", mlp_row_hessian=True, mlp_row_group=1)
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
        assert torch.equal(plain[f"{n}.weight"], rows[f"{n}.weight"]), n
    # a row prior far above the gains' correlations decouples the rows as well (--mlp-row-damp)
    damped = _quant(model, tmp_path / "d", method="boa", mlp_row_hessian=True, mlp_row_damp=1e4)
    for n in ("mlp.gate_proj", "mlp.up_proj"):
        assert (plain[f"{n}.qcodes"] != rows[f"{n}.qcodes"]).float().mean() > 0.05, n
        for other in (diag, damped):
            agree = (plain[f"{n}.qcodes"] == other[f"{n}.qcodes"]).float().mean().item()
            assert agree > 0.99, (n, agree)


def test_mlp_row_damp_adds_a_fraction_of_each_groups_mean_diagonal():
    g = torch.Generator().manual_seed(3)
    m, W_out = torch.randn(64, 12, generator=g, dtype=torch.float64), torch.randn(8, 12, generator=g, dtype=torch.float64)
    S = gain_grams(m, 4) / 64
    H0, H1 = mlp_row_hessian(S, W_out), mlp_row_hessian(S, W_out, 0.5)
    for k in range(3):
        want = H0[k] + 0.5 * H0[k].diagonal().mean() * torch.eye(4, dtype=torch.float64)
        assert torch.allclose(H1[k], want)


def test_options_added_later_keep_old_runs_resumable():
    """A run keyed before an option existed has the same key as one with the option at the value that
    reproduces the old code; options that do not act on a configuration are not in its key."""
    from lowmem_boa.config import QuantConfig
    old_solver = dict(fp_targets=False, refine_scales=0, follow_grids=False, joint_rows=1, grid_coarse=1)   # before issue 17
    qc = QuantConfig(model="m", method="boa", **old_solver)
    later = ("mlp_row_damp", "fp_alpha", "follow_grids", "refine_scales", "joint_rows", "grid_coarse", "kquant",
             "kquant_types", "kquant_embedding", "residual_weights", "fp_max_shift", "block_v_targets")
    old = {k: v for k, v in qc.as_dict().items() if k not in later}
    assert qc.state_dict() == old
    assert QuantConfig(model="m", method="boa", mlp_row_damp=0.1, **old_solver).state_dict()["mlp_row_damp"] == 0.1
    assert QuantConfig(model="m", method="boa", joint_rows=4).state_dict()["joint_rows"] == 4
    # the new defaults are in the key: a run of the old code does not silently resume under them
    new = QuantConfig(model="m", method="boa", fp_targets=True).state_dict()
    assert new["fp_alpha"] == 0.25 and new["refine_scales"] == 1 and new["follow_grids"] is True
    assert new["fp_max_shift"] == 1.0
    assert "fp_max_shift" not in QuantConfig(model="m", method="boa", fp_targets=True, fp_max_shift=0.0).state_dict()
    assert new["joint_rows"] is None and new["grid_coarse"] == 8     # None: 16 rows, at most a quarter of a head
    gptq = QuantConfig(model="m", method="gptq", fp_targets=False).state_dict()
    assert "follow_grids" not in gptq and "joint_rows" not in gptq and "fp_alpha" not in gptq


def test_block_v_default_changed_gptq_keys_kept_boa_runs_named_the_flag(tmp_path):
    """block_v went off by default: GPTQ/RTN (which it does not act on) keep the key they had before; a BoA
    run started under the old default is refused with the flag that resumes it, and resumes with it."""
    import json as _json

    from lowmem_boa.checkpoint.state import MANIFEST, STATE_DIR, RunState, StateError, config_key
    from lowmem_boa.config import QuantConfig
    assert QuantConfig(model="m").block_v is None     # resolved by the pipeline: off at 2 bits, on from 3
    for method in ("gptq", "rtn"):
        assert QuantConfig(model="m", method=method).state_dict() == \
            QuantConfig(model="m", method=method, block_v=True).state_dict()
        assert QuantConfig(model="m", method=method).state_dict()["block_v"] is True
    old = QuantConfig(model="m", method="boa", block_v=True).state_dict()
    new = QuantConfig(model="m", method="boa", block_v=False).state_dict()     # the 2-bit default, resolved
    assert old["block_v"] is True and new["block_v"] is False
    state = tmp_path / "out" / STATE_DIR
    state.mkdir(parents=True)
    (state / MANIFEST).write_text(_json.dumps({"key": config_key(old), "config": old}))
    with pytest.raises(StateError, match="differs in: block_v; the default of --block-v changed .* pass --block-v"):
        RunState.check_output(tmp_path / "out", new, overwrite=False)
    assert RunState.check_output(tmp_path / "out", old, overwrite=False) == "resume"
    # a run started with --no-block-v under the old default: no hint (the flag was the user's)
    (state / MANIFEST).write_text(_json.dumps({"key": config_key(new), "config": new}))
    with pytest.raises(StateError) as e:
        RunState.check_output(tmp_path / "out", old, overwrite=False)
    assert "changed since" not in str(e.value) and "differs in: block_v" in str(e.value)


def test_mlp_row_group_default_changed_other_keys_kept_boa_runs_named_the_flag(tmp_path):
    """--mlp-row-group went from 128 to 512: configurations it does not act on (GPTQ/RTN, BoA without MLP row
    Hessians) keep the key they had; a BoA run with MLP rows started under 128 is refused with the flag."""
    import json as _json

    from lowmem_boa.checkpoint.state import MANIFEST, STATE_DIR, RunState, StateError, config_key
    from lowmem_boa.config import CHANGED_DEFAULTS, QuantConfig
    assert QuantConfig(model="m").mlp_row_group == 512 and CHANGED_DEFAULTS["mlp_row_group"][0] == 128
    for kw in (dict(method="gptq"), dict(method="rtn"), dict(method="boa", mlp_row_hessian=False),
               dict(method="boa", wbits=4)):
        assert QuantConfig(model="m", **kw).state_dict() == QuantConfig(model="m", mlp_row_group=128, **kw).state_dict()
        assert QuantConfig(model="m", **kw).state_dict()["mlp_row_group"] == 128
    for kw in (dict(method="boa"), dict(method="boa", wbits=4, mlp_row_hessian=True)):
        assert QuantConfig(model="m", **kw).state_dict()["mlp_row_group"] == 512
    old = QuantConfig(model="m", method="boa", mlp_row_group=128).state_dict()
    new = QuantConfig(model="m", method="boa").state_dict()
    state = tmp_path / "out" / STATE_DIR
    state.mkdir(parents=True)
    (state / MANIFEST).write_text(_json.dumps({"key": config_key(old), "config": old}))
    with pytest.raises(StateError, match="differs in: mlp_row_group; the default of --mlp-row-group changed .* "
                                         "pass --mlp-row-group 128"):
        RunState.check_output(tmp_path / "out", new, overwrite=False)
    assert RunState.check_output(tmp_path / "out", old, overwrite=False) == "resume"


def test_new_solver_options_refuse_bad_values_before_any_work():
    from lowmem_boa.config import QuantConfig
    for kw, flag in ((dict(fp_alpha=0.0), "--fp-alpha"), (dict(fp_alpha=1.5), "--fp-alpha"),
                     (dict(block_v_targets=True, block_v=False), "--block-v-targets"),
                     (dict(block_v_targets=True, fp_targets=False), "--block-v-targets"),
                     (dict(block_v_targets=True, true_sequential=True), "--block-v-targets"),
                     (dict(refine_scales=-1), "--refine-scales"), (dict(joint_rows=0), "--joint-rows"),
                     (dict(grid_coarse=0), "--grid-coarse"), (dict(fp_max_shift=-1.0), "--fp-max-shift"),
                     (dict(fp_max_shift=float("nan")), "--fp-max-shift")):
        with pytest.raises(ValueError, match=flag):
            QuantConfig(model="m", method="boa", **kw).validate()


@needs_shared
def test_mlp_rows_default_on_up_to_three_bits_and_says_so():
    from lowmem_boa.config import QuantConfig, RunOptions
    from lowmem_boa.pipeline import prepare_run
    from tiny_models import SHARED
    model = str(SHARED / "models" / "stories260K")
    for method, bits, expect in (("boa", 2, True), ("boa", 3, True), ("boa", 4, False), ("gptq", 2, False)):
        qc = QuantConfig(model=model, method=method, wbits=bits)
        prep = prepare_run(qc, RunOptions(device="cpu", plan_only=True, progress=False))
        assert qc.mlp_row_hessian is expect, (method, bits)
        said = [n for n in prep.notes if "MLP-input layers" in n]
        assert len(said) == (method == "boa"), prep.notes
        assert (prep.plan.inputs.mlp_row_group == 172) is expect    # 172 rows: one group (the default: up to 512)
    qc = QuantConfig(model=model, method="boa", wbits=4, mlp_row_hessian=True)
    assert prepare_run(qc, RunOptions(device="cpu", plan_only=True, progress=False)).plan.inputs.mlp_row_group == 172
    qc = QuantConfig(model=model, method="boa", wbits=2, mlp_row_group=128)
    assert prepare_run(qc, RunOptions(device="cpu", plan_only=True, progress=False)).plan.inputs.mlp_row_group == 86


@needs_shared
def test_block_v_default_is_one_rule_for_the_pipeline_and_for_block_v_targets():
    """The pipeline resolves ``block_v`` with ``QuantConfig.default_block_v``, and ``--block-v-targets``
    without ``--block-v`` is accepted exactly where that default turns block_v on."""
    from lowmem_boa.config import BLOCK_V_MIN_BITS, QuantConfig, RunOptions
    from lowmem_boa.pipeline import prepare_run
    from tiny_models import SHARED
    model = str(SHARED / "models" / "stories260K")
    for method, bits in (("boa", 2), ("boa", BLOCK_V_MIN_BITS), ("boa", 4), ("gptq", 3)):
        expect = method == "boa" and bits >= BLOCK_V_MIN_BITS
        assert QuantConfig(model=model, method=method, wbits=bits).default_block_v() is expect
        qc = QuantConfig(model=model, method=method, wbits=bits)
        prepare_run(qc, RunOptions(device="cpu", plan_only=True, progress=False))
        assert qc.block_v is expect, (method, bits)
        targets = QuantConfig(model=model, method=method, wbits=bits, block_v_targets=True)
        if expect:
            targets.validate()
        else:
            with pytest.raises(ValueError, match="--block-v-targets") as err:
                targets.validate()
            assert "--block-v" in str(err.value).split("needs", 1)[1]
