"""Lean footprint and disk: chunked tokenization, CPU chunk cap, compact run state, the disk plan,
--no-fake-quant, --state-dir, --overwrite, offline hub errors, file permissions."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.data import DataError, file_source, load_source
from lowmem_boa.data import calibration as calib_mod
from lowmem_boa.data.calibration import _encode, tokenize_text
from lowmem_boa.models import get_adapter
from lowmem_boa.pipeline import prepare_run, quantize_model
from lowmem_boa.scheduler import PlanError, load_config
from lowmem_boa.scheduler.planner import CPU_CHUNK_TOKENS, DISK_FAKE, DISK_STATE, PlanInputs, make_plan
from lowmem_boa.ui import Console

from tiny_models import DATA, REPO, needs_shared, save_tiny_model

pytestmark = needs_shared
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", seed=5, n_layers=2)


def _run(model_dir, out, **kw):
    qc = QuantConfig(model=str(model_dir), method=kw.pop("method", "boa"), wbits=kw.pop("wbits", 2),
                     nsamples=kw.pop("nsamples", 6), seqlen=kw.pop("seqlen", 48))
    ro = RunOptions(output=str(out), device="cpu", data_dir=DATA, progress=False, **kw)
    return quantize_model(qc, ro, Console(progress=False))


# ----- tokenization in pieces --------------------------------------------------------------------
@pytest.mark.parametrize("model,text", [("llama-wt2-9m", ("wikitext2", "test")), ("opt-wt2-10m", ("ptb", "test")),
                                        ("stories260K", "tinystories/validation.txt")])
def test_tokenizing_in_pieces_equals_one_call(model, text):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SHARED / "models" / model)
    src = file_source(SHARED / "data" / text) if isinstance(text, str) else load_source(*text, DATA)
    notes = []
    pieces = tokenize_text(tok, src.docs[0], notes.append, piece_chars=1 << 15)   # ~12-40 borders
    assert len(calib_mod._borders(src.docs[0], 1 << 15)) > 10
    assert notes == []                         # no fallback: the pieces were used
    assert torch.equal(pieces, torch.tensor(_encode(tok, src.docs[0], True)))


class _NonLocal:
    """A 'tokenizer' whose ids depend on the whole text (fails the border check)."""
    model_max_length = 10

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(text) % 7] + [ord(c) for c in text]}


def test_tokenizer_failing_the_border_check_falls_back_to_one_call():
    text = ("word " * 40 + "\n") * 200
    notes = []
    ids = tokenize_text(_NonLocal(), text, notes.append, piece_chars=512)
    assert len(notes) == 1 and "one call" in notes[0]
    assert ids.tolist() == _NonLocal()(text)["input_ids"]


# ----- planner: CPU chunk cap and the disk plan --------------------------------------------------
def test_cpu_default_budget_is_a_ceiling(tiny, tmp_path):
    qc = QuantConfig(model=str(tiny), nsamples=64, seqlen=48)
    capped = prepare_run(qc, RunOptions(output=str(tmp_path / "a"), device="cpu", data_dir=DATA, progress=False))
    assert capped.plan.chunk * 48 <= CPU_CHUNK_TOKENS and capped.plan.chunk > 1
    qc2 = QuantConfig(model=str(tiny), nsamples=64, seqlen=48)
    given = prepare_run(qc2, RunOptions(output=str(tmp_path / "b"), device="cpu", max_gpu_mem="4GiB", data_dir=DATA,
                                        progress=False))
    assert given.plan.chunk == 64          # an explicit budget is still spent on the largest chunk


def test_disk_plan_of_llama_2_7b_fits_kaggle():
    adapter = get_adapter(load_config(str(REPO / "configs" / "llama-2-7b.json")))
    inp = PlanInputs(method="boa", calibration=True, nsamples=128, seqlen=2048, dtype_bytes=2, wbits=2)
    plan = make_plan(adapter, inp, 14 * 2 ** 30, 8 * 2 ** 30)   # host RAM short: activations on disk
    assert plan.activations_on_disk
    # codes of 6.5 G linear weights at 2 bits + grids; fake-quant = every parameter in float16
    assert 1.5e9 < plan.disk_terms[DISK_STATE] < 1.8e9
    # (the plan counts an upper bound of biases and norms: +0.03 %)
    assert 2 * 6_738_415_616 <= plan.disk_terms[DISK_FAKE] <= 2 * 6_738_415_616 * 1.001
    assert plan.disk_peak <= 20e9


def _payload(files) -> int:
    """Bytes of tensor data in safetensors files (without their JSON headers)."""
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as h:
            total += sum(h.get_tensor(k).nbytes for k in h.keys())
    return total


def test_disk_plan_matches_the_files_written(tmp_path):
    # OPT: every linear has a bias and every norm a weight and a bias, as the plan counts them
    # (for Llama-style blocks it counts biases that are not there: an upper bound)
    out = tmp_path / "out"
    rep = _run(save_tiny_model("opt", tmp_path / "opt", seed=2, n_layers=2), out, export=["packed"])
    terms = rep["plan"]["disk_terms"]
    state = _payload((out / "quant_state").glob("block_*.safetensors"))
    fake = _payload(out.glob("model*.safetensors"))
    packed = _payload((out / "packed").glob("model*.safetensors"))
    for planned, actual in ((terms[DISK_STATE], state), (terms[DISK_FAKE], fake), (terms["export packed"], packed)):
        assert planned == actual, (planned, actual)


def test_short_disk_is_refused_before_work(tiny, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(PlanError, match="not enough disk space.*--no-fake-quant"):
        _run(tiny, out)
    assert not out.exists()


# ----- compact state, --no-fake-quant, --state-dir, --overwrite ----------------------------------
def test_state_is_compact_and_rebuilds_the_fake_quant_weights(tiny, tmp_path):
    from lowmem_boa.checkpoint import RunState
    from safetensors.torch import load_file
    out = tmp_path / "out"
    _run(tiny, out)
    fake = load_file(out / "model.safetensors")
    state = RunState(out)
    for i in range(2):
        with safe_open(str(state.block_path(i)), "pt") as f:
            keys = set(f.keys())
            meta = json.loads(f.metadata()["lowmem_boa"])
        assert meta["rebuilt"] and not any(k.endswith(".qcodes") for k in keys)
        assert not any(f"{n}.weight" in keys for n in meta["rebuilt"])
        weights, _ = state.load_block(i)
        for k, v in weights.items():
            assert torch.equal(v, fake[f"model.layers.{i}.{k}"]), k


def test_no_fake_quant_writes_the_packed_checkpoint_only(tiny, tmp_path):
    from lowmem_boa.scheduler import open_checkpoint
    ref, out = tmp_path / "ref", tmp_path / "out"
    _run(tiny, ref)
    rep = _run(tiny, out, fake_quant=False)
    assert not (out / "model.safetensors").exists() and (out / "config.json").is_file()
    assert rep["exports"] == ["packed"] and rep["plan"]["disk_terms"][DISK_FAKE] == 0
    a, b = open_checkpoint(ref), open_checkpoint(out / "packed")
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k


def test_state_dir_apart_from_output_resumes(tiny, tmp_path):
    out, st = tmp_path / "out", tmp_path / "elsewhere" / "state"
    _run(tiny, out, state_dir=str(st))
    assert (st / "manifest.json").is_file() and not (out / "quant_state").exists()
    rep = _run(tiny, out, state_dir=str(st))
    assert rep["resumed_from_block"] == 2


def test_overwrite_starts_over_on_the_same_configuration(tiny, tmp_path):
    out = tmp_path / "out"
    _run(tiny, out)
    assert _run(tiny, out)["resumed_from_block"] == 2           # default: resume
    rep = _run(tiny, out, overwrite=True)
    assert rep["resumed_from_block"] is None
    assert json.loads((out / "quant_state" / "manifest.json").read_text())["resumed"] == 0


# ----- small things -------------------------------------------------------------------------------
def test_offline_hub_calibration_is_a_clear_error_before_work(tiny, tmp_path, monkeypatch):
    def offline(name, split):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(calib_mod, "_hub_source", offline)
    qc = QuantConfig(model=str(tiny), nsamples=4, seqlen=32)
    with pytest.raises(DataError, match="--data-dir DIR.*--calib-file FILE"):
        prepare_run(qc, RunOptions(output=str(tmp_path / "out"), device="cpu", progress=False))
    assert not (tmp_path / "out").exists()


def test_output_files_honour_the_umask(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        _run(tiny, out)
    finally:
        os.umask(old)
    for f in [out / "model.safetensors", out / "quant_report.json", *(out / "quant_state").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_settled_accumulator_leaves_the_ledger_on_cpu():
    from lowmem_boa.scheduler import Ledger, Scheduler
    ledger = Ledger(torch.device("cpu"), 2 ** 20)
    sch = Scheduler(None, None, torch.device("cpu"), ledger, torch.float32, hessians_on_device=True)
    for _ in range(3):       # one per block: a reservation left behind would pile up
        acc = sch.accumulator("H qkv", (64, 64))
        assert ledger.current == 64 * 64 * 4
        sch.settle("H qkv", acc)
        assert ledger.current == 0 and not ledger.holds("H qkv")


def test_finished_run_reexports_without_the_corpus(tiny, tmp_path, monkeypatch):
    """Rerunning a finished command with --export added needs neither the calibration text nor
    disk space for what it already wrote."""
    out = tmp_path / "out"
    _run(tiny, out)

    def offline(name, split):
        raise ConnectionError("offline")
    monkeypatch.setattr(calib_mod, "_hub_source", offline)
    qc = QuantConfig(model=str(tiny), wbits=2, nsamples=6, seqlen=48)
    rep = quantize_model(qc, RunOptions(output=str(out), device="cpu", progress=False, export=["packed"]),
                         Console(progress=False))
    assert rep["resumed_from_block"] == 2 and (out / "packed" / "config.json").is_file()
