"""run_eval.py: perplexity equals brute force, both checkpoint formats, errors, lm-eval integration."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.data import eval_windows, load_source
from lowmem_boa.eval import attention_output_errors, streaming_nll
from lowmem_boa.export.formats import export_run
from lowmem_boa.pipeline import quantize_model
from lowmem_boa.ui import Console

from tiny_models import DATA, REPO, cli_in_process, needs_shared, save_tiny_model

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


def test_block_errors_equal_brute_force(quantized):
    """Per block: attention-output, whole-block and per-layer errors of the quantized model on the
    original model's block inputs, against hooks on plain transformers models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    fp, q, _ = quantized
    windows = eval_windows(AutoTokenizer.from_pretrained(fp), load_source("wikitext2", "valid", DATA), 32, 3)
    ours = attention_output_errors(fp, q, windows, torch.device("cpu"), 2 ** 30)
    mf = AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float64).eval()
    mq = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float64).eval()
    with torch.no_grad():
        hs = mf(windows, output_hidden_states=True).hidden_states
        pos = torch.arange(windows.shape[1])[None]
        emb = mf.model.rotary_emb(hs[0], pos)
        for i, res in enumerate(ours):
            bf, bq = mf.model.layers[i], mq.model.layers[i]
            x = hs[i]
            ins = {}
            hooks = [m.register_forward_pre_hook(lambda m, a, n=n: ins.__setitem__(n, a[0]))
                     for n, m in bf.named_modules() if isinstance(m, torch.nn.Linear)]
            kw = dict(position_embeddings=emb, attention_mask=None)
            yf = bf(x, **kw)
            yf = yf[0] if isinstance(yf, tuple) else yf
            for h in hooks:
                h.remove()
            yq = bq(x, **kw)
            yq = yq[0] if isinstance(yq, tuple) else yq
            assert res["block_rel_error"] == pytest.approx(float((yq - yf).pow(2).sum() / (yf - x).pow(2).sum()),
                                                           rel=1e-3)
            assert set(res["layers"]) == set(ins)
            for n, xin in ins.items():
                W, Q = bf.get_submodule(n).weight, bq.get_submodule(n).weight
                H = xin.reshape(-1, xin.shape[-1]).T @ xin.reshape(-1, xin.shape[-1])
                dW = Q - W
                want = float(torch.trace(dW @ H @ dW.T) / torch.trace(W @ H @ W.T))
                assert res["layers"][n] == pytest.approx(want, rel=1e-3), n
                assert 0 < want < 1
    # the original model against itself: no error anywhere
    same = attention_output_errors(fp, fp, windows, torch.device("cpu"), 2 ** 30)
    assert all(r["rel_error"] == 0 and r["block_rel_error"] == 0 and not any(r["layers"].values()) for r in same)


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


def test_run_eval_bad_input(quantized, tmp_path, capsys):
    _, q, _ = quantized
    r = _eval("--model", str(q), "--datasets", "wikitext3", "--data-dir", DATA)     # the script itself
    assert r.returncode == 2 and "unknown dataset 'wikitext3'" in r.stderr

    def _eval_here(*args):    # the rest in this process (a subprocess spends ~10 s importing)
        from lowmem_boa.cli.evaluate import main
        return cli_in_process(main, args, capsys)
    r = _eval_here("--model", str(q), "--datasets", "ptb", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "missing data file" in r.stderr
    r = _eval_here("--model", str(tmp_path), "--datasets", "wikitext2", "--data-dir", DATA)
    assert r.returncode == 2 and "no config.json" in r.stderr
    export_run(q, "gptq", tmp_path / "gptq", checkpoint_format="gptq_v2")
    r = _eval_here("--model", str(tmp_path / "gptq"), "--datasets", "wikitext2", "--data-dir", DATA)
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


def test_eval_plan_counts_the_logits_of_every_window_in_a_chunk(quantized):
    """The head phase holds ``chunk x head_tokens`` logits (plus log-probabilities) at once: a
    large-vocabulary evaluation must shrink its chunk to the budget (it once ran out of host RAM)."""
    from lowmem_boa.models import get_adapter
    from lowmem_boa.scheduler import load_config
    from lowmem_boa.scheduler.planner import PHASE_HEAD, make_eval_plan
    config = load_config(str(quantized[0]))
    adapter, vocab = get_adapter(config), config.vocab_size
    budget = 64 * 2 ** 20
    plan = make_eval_plan(adapter, 64, 512, 4, budget)
    assert plan.peak <= budget
    held = plan.chunk * plan.head_tokens * vocab * 4
    assert 3 * held == plan.phase(PHASE_HEAD).terms["logits + log-probabilities (float32)"]
    assert 2 * held <= budget         # logits and their log-softmax, really allocated together
    assert plan.chunk < 64
