"""End to end on SmolLM2-135M, the real LLM that decides quality (30 blocks, d=576, GQA 9/3 x 64).

CI-sized, on 4 WikiText-2 windows of 128 tokens: BoA at 2 bits with the MinMax grid quantizes all
30 blocks, and a run killed in the middle and rerun resumes and is bit-identical to an uninterrupted
run; BoA at 2 bits with the (default) Hessian grid loads with ``from_pretrained`` and its perplexity
on a few held-out windows is finite and far below RTN's. (At 2 bits per channel the MinMax grid
collapses on this model -- PPL ~1e6, no better than RTN -- so the quality check needs the
Hessian grid, ~5 s per block here.) The model is built once from its registry package (``tiny_models.smollm2_dir``).
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowmem_boa.data import eval_windows, load_source
from lowmem_boa.eval import streaming_nll

from tiny_models import DATA, REPO, needs_shared, run_quant_killed_after, smollm2_dir

pytestmark = needs_shared
CPU = torch.device("cpu")
BLOCKS = 30


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_dir()


# The solver before issue 17's corrections: on these 512 calibration tokens the corrected default
# measured worse (perplexity 1145 against 542 on the windows below; fp targets and refinement fitted
# to 512 tokens) and ~2x slower; at 32 x 512 and more tokens the corrections halve the 2-bit
# degradation (docs/results.md). The defaults run end to end on the tiny models in the other tests.
OLD_SOLVER = ("--no-fp-targets", "--refine-scales", "0", "--no-follow-grids", "--joint-rows", "1", "--grid-coarse", "1")


def _args(model, out, *extra):
    return ["--model", str(model), "--output", str(out), "--calib", "wikitext2", "--data-dir", DATA,
            "--device", "cpu", "--no-progress", "--method", "boa", "--wbits", "2", "--nsamples", "4",
            "--seqlen", "128", *OLD_SOLVER, *extra]


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "run_quant.py"), *args], cwd=REPO, capture_output=True,
                          text=True)


def test_smollm2_boa_2bit_kill_and_resume_is_bit_identical(smollm2, tmp_path):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(smollm2)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (BLOCKS, 576, 9, 3)
    minmax = ("--qparam", "minmax")
    ref = tmp_path / "ref"
    r = _cli(*_args(smollm2, ref, *minmax))
    assert r.returncode == 0, r.stderr
    report = json.loads((ref / "quant_report.json").read_text())
    assert len(report["blocks"]) == BLOCKS

    # killed in the middle, rerun with the same command: resumes and gives the same bits
    out = tmp_path / "out"
    done = run_quant_killed_after(_args(smollm2, out, *minmax), out, 8)
    assert 8 <= done < BLOCKS, "kill the run in the middle"
    r = _cli(*_args(smollm2, out, *minmax))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert json.loads((out / "quant_report.json").read_text())["resumed_from_block"] == done
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_smollm2_boa_2bit_loads_and_is_far_better_than_rtn(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "boa"
    r = _cli(*_args(smollm2, out))
    assert r.returncode == 0, r.stderr
    b = load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == BLOCKS
    fp_w = load_file(smollm2 / "model.safetensors")
    changed = [k for k in fp_w if k in b and "proj" in k and not torch.equal(fp_w[k].float(), b[k].float())]
    assert len(changed) == 7 * BLOCKS        # every linear of every block was quantized
    rtn = tmp_path / "rtn"
    r = _cli("--model", str(smollm2), "--output", str(rtn), "--device", "cpu", "--no-progress", "--method", "rtn",
             "--wbits", "2", "--qparam", "minmax")
    assert r.returncode == 0, r.stderr
    win = eval_windows(AutoTokenizer.from_pretrained(smollm2), load_source("wikitext2", "test", DATA), 256, 4)
    ppl = {name: streaming_nll(d, win, CPU, 8 * 2 ** 30)["ppl"] for name, d in
           (("fp", smollm2), ("boa", out), ("rtn", rtn))}
    assert all(math.isfinite(p) for p in ppl.values()), ppl
    # measured: fp 25.1, BoA 542, RTN 6.2e6 (BoA with the MinMax grid: ~3e6, no better than RTN)
    assert ppl["fp"] < ppl["boa"] < min(40 * ppl["fp"], ppl["rtn"] / 100), ppl
