"""run_eval.py: perplexity equals brute force, both checkpoint formats, errors, lm-eval integration."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.data import eval_windows, load_source
from lowmem_boa.eval import streaming_nll
from lowmem_boa.export.formats import export_run
from lowmem_boa.pipeline import quantize_model
from lowmem_boa.ui import Console

from tiny_models import DATA, REPO, needs_shared, save_tiny_model

pytestmark = needs_shared


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = save_tiny_model("qwen3", root / "m", seed=11, n_layers=2)
    qc = QuantConfig(model=str(model), method="gptq", wbits=3, group_size=16, nsamples=4, seqlen=32)
    quantize_model(qc, RunOptions(output=str(root / "q"), device="cpu", data_dir=DATA, progress=False),
                   Console(progress=False))
    export_run(root / "q", "packed", root / "packed")
    return model, root / "q", root / "packed"


def _brute_nll(model_dir, windows):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(m(windows).logits.double()[:, :-1], dim=-1)
    return -logp.gather(-1, windows[:, 1:, None]).mean().item()


def test_streaming_perplexity_equals_brute_force(quantized):
    from transformers import AutoTokenizer
    fp, q, _ = quantized
    windows = eval_windows(AutoTokenizer.from_pretrained(fp), load_source("wikitext2", "test", DATA), 64, 6)
    for d in (fp, q):
        res = streaming_nll(d, windows, torch.device("cpu"), 2 ** 30)
        assert res["tokens"] == 6 * 63
        assert abs(res["nll"] - _brute_nll(d, windows)) < 1e-4


def _eval(*args):
    return subprocess.run([sys.executable, str(REPO / "run_eval.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=900)


def test_run_eval_reads_fake_quant_and_packed_identically(quantized, tmp_path):
    _, q, packed = quantized
    out = {}
    for name, d in (("fake", q), ("packed", packed)):
        r = _eval("--model", str(d), "--datasets", "wikitext2,ptb,c4", "--data-dir", DATA, "--seqlen", "64",
                  "--max-windows", "8", "--device", "cpu", "--json", str(tmp_path / f"{name}.json"), "--no-progress")
        assert r.returncode == 0, r.stderr
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert out[name]["perplexity"]["c4"]["label"] == "C4 validation (first 1025 docs)"
        assert "C4 validation (first 1025 docs)" in r.stderr
    for ds in ("wikitext2", "ptb", "c4"):
        assert out["fake"]["perplexity"][ds]["ppl"] == out["packed"]["perplexity"][ds]["ppl"]
        assert out["fake"]["perplexity"][ds]["windows"] == 8


def test_run_eval_bad_input(quantized, tmp_path):
    _, q, _ = quantized
    r = _eval("--model", str(q), "--datasets", "wikitext3", "--data-dir", DATA)
    assert r.returncode == 2 and "unknown dataset 'wikitext3'" in r.stderr
    r = _eval("--model", str(q), "--datasets", "ptb", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "missing data file" in r.stderr
    r = _eval("--model", str(tmp_path), "--datasets", "wikitext2", "--data-dir", DATA)
    assert r.returncode == 2 and "no config.json" in r.stderr
    export_run(q, "gptq", tmp_path / "gptq", checkpoint_format="gptq_v2")
    r = _eval("--model", str(tmp_path / "gptq"), "--datasets", "wikitext2", "--data-dir", DATA)
    assert r.returncode == 2 and "'gptq' checkpoint" in r.stderr


def test_zero_shot_with_a_local_task(quantized, tmp_path):
    pytest.importorskip("lm_eval")
    _, q, packed = quantized
    data = REPO / "tests" / "fixtures" / "lm_eval_task" / "local_mc.jsonl"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_mc.yaml").write_text(
        "task: lowmem_boa_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    accs = []
    for d in (q, packed):
        r = subprocess.run([sys.executable, str(REPO / "run_eval.py"), "--model", str(d), "--datasets", "",
                            "--tasks", "lowmem_boa_local_mc", "--tasks-include-path", str(tmp_path / "tasks"),
                            "--device", "cpu", "--json", str(tmp_path / "zs.json")], capture_output=True, text=True,
                           cwd=REPO, timeout=900, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads((tmp_path / "zs.json").read_text())["zero_shot"]["lowmem_boa_local_mc"]
        assert 0.0 <= res["acc"] <= 1.0
        accs.append(res["acc"])
    assert accs[0] == accs[1]      # the packed model computes exactly what the fake-quant one does
