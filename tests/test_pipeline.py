"""The streaming pipeline on tiny random models (CPU): results, budgets, refusals, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_boa.checkpoint import RunState
from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.pipeline import prepare_run, quantize_model
from lowmem_boa.scheduler import PlanError
from lowmem_boa.ui import Console

from tiny_models import DATA, REPO, needs_shared, run_quant_in_process, run_quant_killed_after, save_tiny_model

pytestmark = needs_shared


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny_model(f, root / f, seed=3, n_layers=3) for f in ("opt", "llama", "qwen2", "qwen3")}


def _run(model_dir, out, method="boa", wbits=2, budget=None, **kw):
    qc = QuantConfig(model=str(model_dir), method=method, wbits=wbits, nsamples=kw.pop("nsamples", 6),
                     seqlen=kw.pop("seqlen", 48), **{k: v for k, v in kw.items() if k in QuantConfig.__dataclass_fields__})
    ro = RunOptions(output=str(out), device="cpu", max_gpu_mem=budget, data_dir=DATA, progress=False,
                    **{k: v for k, v in kw.items() if k in RunOptions.__dataclass_fields__})
    return quantize_model(qc, ro, Console(progress=False))


def _levels_ok(W, bits, group_size=None):
    gs = group_size or W.shape[1]
    return all(len(torch.unique(W[r, g:g + gs])) <= 2 ** bits for r in range(W.shape[0]) for g in range(0, W.shape[1], gs))


@pytest.mark.parametrize("family", ["opt", "llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["boa", "gptq"])
def test_every_family_quantizes_and_loads(tiny_dirs, tmp_path, family, method):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "out"
    # BoA with block_v (off by default, tested on by default before): every family's attention maps
    report = _run(tiny_dirs[family], out, method=method, wbits=3, act_order_col=True, act_order_row=True,
                  block_v=method == "boa")
    q = AutoModelForCausalLM.from_pretrained(out)
    fp = AutoModelForCausalLM.from_pretrained(tiny_dirs[family])
    qs, fs = q.state_dict(), fp.state_dict()
    adapter_names = [n for n in qs if n.endswith("proj.weight") or n.endswith(("fc1.weight", "fc2.weight"))]
    assert len(adapter_names) == 3 * 7 if family != "opt" else 3 * 6
    for n in qs:
        if n in adapter_names:
            assert _levels_ok(qs[n], 3), n
            assert not torch.equal(qs[n], fs[n])
        else:
            assert torch.equal(qs[n], fs[n]), n   # norms, biases, embeddings untouched
    assert report["memory"]["ledger_peak_bytes"] <= report["memory"]["budget_bytes"]
    # codes in the block files reproduce the exported weights exactly
    blk = RunState(out).load_block(1, codes=True)[0]
    name = "self_attn.q_proj"
    codes, scale, zero = blk[f"{name}.qcodes"], blk[f"{name}.qscale"], blk[f"{name}.qzero"]
    assert torch.equal((scale * (codes.float() - zero)).to(blk[f"{name}.weight"].dtype), blk[f"{name}.weight"])
    with torch.no_grad():
        logits = q(torch.randint(2, 8000, (1, 16))).logits
    assert torch.isfinite(logits).all()
    layers = report["blocks"]["0"]["layers"]
    assert all(l["rel_error"] is not None and l["rel_error"] < 1.0 for l in layers)
    if method == "boa":
        assert all(l["rel_attention_error"] is not None for l in layers[:3])


def test_rtn_needs_no_calibration(tiny_dirs, tmp_path):
    report = _run(tiny_dirs["llama"], tmp_path / "o", method="rtn", wbits=4, qparam="minmax")
    assert report["plan"]["phases"].keys() == {"embed (first block inputs)", "solve (per layer)"}


def _budget_for_chunk(model_dir, nsamples, seqlen, max_chunk, **kw):
    """The largest device budget (searched downward) whose plan uses chunks of at most ``max_chunk``."""
    qc = QuantConfig(model=str(model_dir), nsamples=nsamples, seqlen=seqlen, **kw)
    budget = 64 * 2 ** 20
    while budget > 2 ** 16:
        try:
            plan = prepare_run(QuantConfig(**qc.as_dict()), RunOptions(plan_only=True, device="cpu",
                                                                      max_gpu_mem=str(budget), progress=False)).plan
        except PlanError:
            break
        if plan.chunk <= max_chunk:
            return budget
        budget = int(budget * 0.9)
    raise AssertionError("no budget gives small chunks")


@pytest.mark.parametrize("block_v", [False, True])
def test_budget_is_respected_and_chunks_shrink(tiny_dirs, tmp_path, block_v):
    big = _run(tiny_dirs["llama"], tmp_path / "big", nsamples=8, seqlen=128, block_v=block_v)
    budget = _budget_for_chunk(tiny_dirs["llama"], 8, 128, max_chunk=2, block_v=block_v)
    small = _run(tiny_dirs["llama"], tmp_path / "small", nsamples=8, seqlen=128, budget=str(budget), block_v=block_v)
    assert ("block_v statistics" in small["memory"]["phases"]) == block_v
    assert small["plan"]["chunk"] <= 2 < big["plan"]["chunk"]
    assert small["memory"]["ledger_peak_bytes"] <= budget
    for phase in small["memory"]["phases"].values():
        assert phase["ledger_peak_bytes"] <= budget
    # same math, different chunking: the weights agree up to a few codes flipped by summation order
    # (and, with refined scales, rounding noise in every scale: counted only above 0.1 % of the tensor's range)
    a = load_file(tmp_path / "big" / "model.safetensors")
    b = load_file(tmp_path / "small" / "model.safetensors")
    changed = sum(int(((a[k].float() - b[k].float()).abs() > 1e-3 * a[k].float().abs().max()).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    assert changed <= 0.01 * total


def test_budget_below_one_block_is_refused_before_work(tiny_dirs, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(PlanError, match="too small"):
        _run(tiny_dirs["llama"], out, budget="200KiB")
    assert not out.exists()


@pytest.mark.parametrize("block_v,wbits", [(None, 2), (None, 3), (None, 4), (True, 2), (False, 3)])
def test_plan_only_needs_no_weights_and_names_terms(block_v, wbits):
    kw = {} if block_v is None else {"block_v": block_v}   # None: the default (off at 2 bits, on from 3)
    qc = QuantConfig(model=str(REPO / "configs" / "llama-2-7b.json"), nsamples=128, seqlen=4096, wbits=wbits, **kw)
    # a stated host budget: the default follows this machine's free RAM, which other jobs change
    prep = prepare_run(qc, RunOptions(plan_only=True, device="cpu", max_gpu_mem="14GiB", max_cpu_mem="16GiB",
                                      progress=False))
    assert prep.qc.seqlen == 4096
    assert prep.plan.peak <= 14 * 2 ** 30 * 0.9
    on = wbits >= 3 if block_v is None else block_v
    assert prep.qc.block_v is on
    assert ("block_v statistics" in [p.name for p in prep.plan.phases]) == on


def _cli(*args, **env):
    return subprocess.run([sys.executable, str(REPO / "run_quant.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **env}, timeout=600)


def test_bad_input_gets_clear_errors_before_work(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "o"
    r = _cli("--model", str(tiny_dirs["llama"]), "--wbits", "5", "--output", str(out))   # the script itself
    assert r.returncode == 2 and "--wbits" in r.stderr

    def cli(*args):          # the rest in this process (a subprocess spends ~10 s importing)
        return run_quant_in_process(args, capsys)
    r = cli("--model", str(tiny_dirs["llama"]), "--calib-file", str(tmp_path / "missing.txt"), "--output", str(out),
            "--no-progress")
    assert r.returncode == 2 and "missing.txt" in r.stderr and "does not exist" in r.stderr
    r = cli("--model", str(tiny_dirs["llama"]), "--data-dir", str(tmp_path), "--output", str(out), "--no-progress")
    assert r.returncode == 2 and "missing data file" in r.stderr
    r = cli("--model", str(tmp_path / "nope"), "--output", str(out), "--no-progress")
    assert r.returncode == 2 and "does not exist" in r.stderr
    from transformers import GPT2Config
    gdir = tmp_path / "gpt2"
    gdir.mkdir()
    GPT2Config(n_layer=1).save_pretrained(gdir)
    r = cli("--model", str(gdir), "--output", str(out), "--no-progress")
    assert r.returncode == 2 and "unsupported model" in r.stderr and "Llama" in r.stderr
    assert not out.exists()
    # a non-empty directory that is not ours is never touched
    other = tmp_path / "users_dir"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = cli("--model", str(tiny_dirs["llama"]), "--output", str(other), "--data-dir", DATA, "--no-progress",
            "--nsamples", "2", "--seqlen", "16")
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def _args(model, out, *extra):
    return ["--model", str(model), "--output", str(out), "--data-dir", DATA, "--device", "cpu", "--no-progress",
            "--method", "boa", "--wbits", "2", "--nsamples", "6", "--seqlen", "48", "--act-order-col", *extra]


def _weights(out):
    return load_file(Path(out) / "model.safetensors")


def test_kill_and_resume_is_bit_identical(tmp_path):
    model = save_tiny_model("llama", tmp_path / "m", seed=5, n_layers=6)
    ref = tmp_path / "ref"
    r = _cli(*_args(model, ref))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    done = run_quant_killed_after(_args(model, out), out, 2, timeout=300)
    assert 2 <= done < 6, "kill the run in the middle"
    assert not (out / "model.safetensors").exists()
    r = _cli(*_args(model, out))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    # the default device budget follows free RAM, which may differ between the runs; the plan it gives does not
    assert "differ from the first run" not in r.stderr
    report = json.loads((out / "quant_report.json").read_text())
    assert report["resumed_from_block"] == done
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # a truncated block file is detected and that block (and later ones) redone, same result
    blk = out / "quant_state" / "block_0003.safetensors"
    data = blk.read_bytes()
    blk.write_bytes(data[: len(data) // 2])
    r = _cli(*_args(model, out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "quant_report.json").read_text())["resumed_from_block"] == 3
    c = _weights(out)
    for k in a:
        assert torch.equal(a[k], c[k]), k

    # a resume whose budget gives smaller chunks says which setting changed (its sums may differ in the last bits)
    small = _budget_for_chunk(model, 6, 48, max_chunk=3, method="boa", wbits=2)
    blk.write_bytes(data[: len(data) // 2])
    r = _cli(*_args(model, out, "--max-gpu-mem", str(small)))
    assert r.returncode == 0, r.stderr
    assert "differ from the first run (chunk " in r.stderr

    # a different configuration in the same directory is refused, unless --overwrite
    r = _cli(*_args(model, out, "--no-act-order-row"))    # (BoA's 2-bit default: rows by act-order)
    assert r.returncode == 2 and "different configuration" in r.stderr and "act_order_row" in r.stderr
    assert "changed since" not in r.stderr      # the flag was the user's, not a changed default
    r = _cli(*_args(model, out, "--no-act-order-row", "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "quant_report.json").read_text())["config"]["act_order_row"] is False


def test_activations_on_disk_when_host_budget_is_small(tiny_dirs, tmp_path):
    n, L = 16, 128
    device_budget = str(_budget_for_chunk(tiny_dirs["qwen3"], n, L, max_chunk=2))
    ref = _run(tiny_dirs["qwen3"], tmp_path / "ram", nsamples=n, seqlen=L, budget=device_budget)
    terms = ref["plan"]["cpu_terms"]
    acts = terms["activations (in + out)"]
    # a host budget that holds everything but the activations
    host_budget = int((sum(terms.values()) - acts / 2) / 0.9)
    disk = _run(tiny_dirs["qwen3"], tmp_path / "disk", nsamples=n, seqlen=L, budget=device_budget,
                max_cpu_mem=str(host_budget))
    assert disk["plan"]["activations_on_disk"] and not ref["plan"]["activations_on_disk"]
    a, b = _weights(tmp_path / "ram"), _weights(tmp_path / "disk")
    for k in a:
        assert torch.equal(a[k], b[k]), k
