"""One-forward block statistics (the default one-pass order): the same sums as the per-group
phases they replace, bit for bit, in every family and with every statistic that rides on them
(fp-target cross statistics and the fp stream's next input, BoA's q/k row Grams, the MLP gains),
and a plan that has the merged phase instead of the four."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from lowmem_boa import block as block_mod
from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.forward import capture_input, capture_inputs
from lowmem_boa.models import get_adapter
from lowmem_boa.pipeline import quantize_model
from lowmem_boa.scheduler import PlanInputs, make_plan
from lowmem_boa.scheduler.planner import (PHASE_ATTN, PHASE_FP_PROPAGATE, PHASE_MLP_IN, PHASE_MLP_OUT, PHASE_OUT,
                                          PHASE_STATS)
from lowmem_boa.ui import Console

from tiny_models import DATA, REPO, needs_shared, save_tiny_model, tiny_config, tiny_model

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_one_pass import per_group  # noqa: E402   (the per-group phases, as before the one-forward pass)


@pytest.mark.parametrize("family", ["opt", "llama", "qwen3"])
def test_capture_inputs_records_what_capture_input_returns(family):
    model = tiny_model(family, seed=1)
    adapter = get_adapter(model.config)
    blk = model.get_submodule(adapter.blocks_prefix)[0]
    x = torch.randn(2, 12, model.config.hidden_size)
    kwargs = {}
    if adapter.uses_rope:
        pos = torch.arange(12).unsqueeze(0)
        kwargs["position_embeddings"] = model.model.rotary_emb(x, pos)
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None].expand(2, 1, 12, 12)
    kwargs["attention_mask"] = mask
    layers = [adapter.q_proj, adapter.o_proj, adapter.mlp_in[0], adapter.mlp_out]
    with torch.no_grad():
        got, out = capture_inputs(blk, layers, x, kwargs)
        assert out is None
        for name in layers:
            assert torch.equal(got[name], capture_input(blk, name, x, kwargs)), name
        full, out = capture_inputs(blk, layers, x, kwargs, full=True)
        ref = blk(x, **kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref
        assert torch.equal(out, ref)
        assert all(torch.equal(full[n], got[n]) for n in layers)
    with pytest.raises(RuntimeError, match="never called extra"):
        _never_called()


class _Skips(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.extra = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x)


def _never_called():
    """A module that is registered but never run is reported, not silently missing."""
    capture_inputs(_Skips(), ["used", "extra"], torch.zeros(1, 2), {}, full=True)


def _quant(model_dir, out, **kw):
    qc = QuantConfig(model=str(model_dir), wbits=2, nsamples=6, seqlen=48, **kw)
    ro = RunOptions(output=str(out), device="cpu", data_dir=DATA, progress=False)
    return quantize_model(qc, ro, Console(progress=False))


@needs_shared
@pytest.mark.parametrize("family,kw", [
    ("llama", dict(method="boa", fp_targets=True, mlp_row_hessian=True)),
    ("opt", dict(method="gptq", fp_targets=True)),
    ("qwen3", dict(method="boa", fp_targets=False)),
])
def test_one_forward_statistics_equal_the_per_group_phases_bit_for_bit(tmp_path, monkeypatch, family, kw):
    """A whole run with the one-forward statistics writes the same checkpoint as the same run with
    the per-group phases: every H, C, row Gram, gain Gram and fp-stream input is the same sum."""
    model = save_tiny_model(family, tmp_path / "m", seed=7, n_layers=3)
    new = tmp_path / "new"
    report = _quant(model, new, **kw)
    phases = report["blocks"]["1"]["phase_seconds"]
    assert PHASE_STATS in phases and PHASE_ATTN not in phases and PHASE_FP_PROPAGATE not in phases

    unplanned = block_mod.BlockQuantizer._workspace
    monkeypatch.setattr(block_mod.BlockQuantizer, "one_pass_statistics", per_group)
    monkeypatch.setattr(block_mod.BlockQuantizer, "_workspace",
                        lambda self, name: unplanned(self, name) if self._planned(name)
                        else self.sch.workspace(f"workspace: {name}", 0))
    old = tmp_path / "old"
    report = _quant(model, old, **kw)
    assert PHASE_OUT in report["blocks"]["1"]["phase_seconds"]
    a, b = load_file(new / "model.safetensors"), load_file(old / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fp", [False, True])
def test_the_plan_has_one_statistics_phase_unless_true_sequential(fp):
    adapter = get_adapter(tiny_config("llama"))
    common = dict(method="boa", calibration=True, nsamples=8, seqlen=32, dtype_bytes=4, device_type="cpu",
                  fp_targets=fp, mlp_row_group=32)
    one = make_plan(adapter, PlanInputs(**common), 2 ** 30, 2 ** 32)
    names = [p.name for p in one.phases]
    assert PHASE_STATS in names and not {PHASE_ATTN, PHASE_OUT, PHASE_MLP_IN, PHASE_MLP_OUT} & set(names)
    assert PHASE_FP_PROPAGATE not in names and PHASE_FP_PROPAGATE not in one.gflop_per_block
    assert ("C partial" in one.phase(PHASE_STATS).terms) == fp
    assert "E[m m^T] partial" in one.phase(PHASE_STATS).terms
    if not fp:   # the per-group plan of the same run (true-sequential) does more arithmetic
        seq = make_plan(adapter, PlanInputs(**common, true_sequential=True), 2 ** 30, 2 ** 32)
        per_group_gflop = sum(seq.gflop_per_block[p] for p in (PHASE_ATTN, PHASE_OUT, PHASE_MLP_IN, PHASE_MLP_OUT))
        assert one.gflop_per_block[PHASE_STATS] < per_group_gflop
        assert PHASE_STATS not in seq.gflop_per_block
    # held on the host: every set at once, block_v's after them
    assert one.host_by_phase[PHASE_STATS] <= one.host_by_phase["block_v statistics"]


def test_residual_token_weights_are_the_inverse_mean_square_and_weigh_every_sum():
    from lowmem_boa.stats import residual_token_weights
    out = torch.randn(2, 5, 8, dtype=torch.float64)
    out[0, 0] *= 1000                                    # a "sink" token
    w = residual_token_weights(out)
    assert w.shape == (2, 5) and torch.allclose(w.double(), 1 / out.pow(2).mean(-1))

    class Sch:
        @staticmethod
        def accumulate(acc, t):
            acc += t

    x, xf = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    acc = {"H": torch.zeros(4, 4), "C": torch.zeros(4, 4), "m": None}
    fake = type("Fake", (), {"sch": Sch()})()
    block_mod.BlockQuantizer._col_add(fake, None, acc, x, xf, w)
    wt = w.double().reshape(-1, 1)
    xr, xfr = x.reshape(-1, 4), xf.reshape(-1, 4)
    assert torch.allclose(acc["H"].double(), (xr * wt).T @ xr, rtol=1e-5)
    assert torch.allclose(acc["C"].double(), (xfr * wt).T @ xr, rtol=1e-5)


@needs_shared
@pytest.mark.parametrize("method", ["gptq", "boa"])
def test_residual_weights_weigh_only_the_mlp_output_layer_by_the_block_output(tmp_path, monkeypatch, method):
    """``--residual-weights``: the MLP-output layer's H of block 0 is the brute-force weighted mean
    ``sum_t w_t x_t x_t^T / sum_t w_t``, ``w_t`` = 1 / mean square of block 0's output (Hugging Face's
    own forward on the calibration windows); every other layer's statistics are untouched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lowmem_boa.data import calibration_windows, load_source
    model_dir = save_tiny_model("llama", tmp_path / "m", seed=3, n_layers=2)
    settled = {}
    original = block_mod.BlockQuantizer._col_settle

    def recording(self, acc, tokens):
        out = original(self, acc, tokens)
        settled.setdefault((self.qc.residual_weights, acc["layer"]), out[0].clone())
        return out

    monkeypatch.setattr(block_mod.BlockQuantizer, "_col_settle", recording)
    reports = {rw: _quant(model_dir, tmp_path / f"q{rw}", method=method, residual_weights=rw) for rw in (False, True)}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ids = calibration_windows(AutoTokenizer.from_pretrained(model_dir), load_source("wikitext2", "train", DATA),
                              6, 48, 0)
    box = {}
    layer0 = model.model.layers[0]
    layer0.mlp.down_proj.register_forward_pre_hook(lambda m, a: box.__setitem__("x", a[0]))
    layer0.register_forward_hook(lambda m, a, o: box.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(ids)
    x = box["x"].reshape(-1, box["x"].shape[-1])
    w = 1 / box["h"].pow(2).mean(-1).reshape(-1, 1)
    name = "mlp.down_proj"
    assert torch.allclose(settled[(True, name)].double(), (x * w).T @ x / w.sum(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(settled[(False, name)].double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(settled[(True, name)], settled[(False, name)], rtol=1e-2)
    for layer in ("self_attn.o_proj", "mlp.gate_proj"):
        assert torch.equal(settled[(True, layer)], settled[(False, layer)]), layer
    assert reports[True]["config"]["residual_weights"] is True


def test_residual_weights_are_refused_where_they_do_not_apply():
    for kw in (dict(method="rtn"), dict(method="boa", true_sequential=True, fp_targets=False)):
        with pytest.raises(ValueError, match="--residual-weights"):
            QuantConfig(model="m", residual_weights=True, **kw).validate()
