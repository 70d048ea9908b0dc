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
