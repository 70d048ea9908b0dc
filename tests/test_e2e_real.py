"""End to end on the real trained checkpoints in ../shared/models (CPU, a few minutes)."""

import math

import pytest
import torch

from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.data import eval_windows, load_source
from lowmem_boa.eval import attention_output_errors, streaming_nll
from lowmem_boa.pipeline import quantize_model
from lowmem_boa.ui import Console

from tiny_models import DATA, SHARED, needs_shared

pytestmark = needs_shared
CPU = torch.device("cpu")
BUDGET = 8 * 2 ** 30


def _windows(model_dir, split, n):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return eval_windows(tok, load_source("wikitext2", split, DATA), 512, n)


def test_streaming_nll_equals_a_plain_transformers_forward():
    from transformers import AutoModelForCausalLM
    mdir = SHARED / "models" / "opt-wt2-10m"
    win = _windows(mdir, "test", 4)
    ours = streaming_nll(mdir, win, CPU, BUDGET)
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(win).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, win[:, 1:, None]).mean().item()
    assert ours["tokens"] == win.shape[0] * (win.shape[1] - 1)
    assert abs(ours["nll"] - nll) < 1e-4


@pytest.mark.parametrize("model,method,bits,extra", [
    ("llama-wt2-9m", "boa", 2, dict(act_order_col=True)),
    ("opt-wt2-10m", "gptq", 3, dict(act_order_col=True)),
])
def test_real_checkpoint_quantizes_and_stays_close(tmp_path, model, method, bits, extra):
    mdir = SHARED / "models" / model
    qc = QuantConfig(model=str(mdir), method=method, wbits=bits, nsamples=16, seqlen=256, **extra)
    ro = RunOptions(output=str(tmp_path / "q"), device="cpu", data_dir=DATA, progress=False)
    report = quantize_model(qc, ro, Console(progress=False))
    test = _windows(mdir, "test", 24)
    fp = streaming_nll(mdir, test, CPU, BUDGET)["ppl"]
    q = streaming_nll(tmp_path / "q", test, CPU, BUDGET)["ppl"]
    assert math.isfinite(q) and fp < q < 1.5 * fp      # 2/3-bit costs a little on these robust models
    errs = attention_output_errors(mdir, tmp_path / "q", _windows(mdir, "valid", 4), CPU, BUDGET)
    assert len(errs) == 4 and all(0 < e["rel_error"] < 0.5 for e in errs)
    assert report["memory"]["ledger_peak_bytes"] <= report["memory"]["budget_bytes"]
