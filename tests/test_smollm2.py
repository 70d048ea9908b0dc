"""End to end on SmolLM2-135M, the real LLM that decides quality (30 blocks, d=576, GQA 9/3 x 64): a
kill and rerun is bit-identical.

CI-sized, on 4 WikiText-2 windows of 128 tokens: BoA at 2 bits with the default solver (fp targets
and their second activation stream, act-order, joint rows; MLP row groups of 128) and the MinMax grid
quantizes all 30 blocks, and a run killed in the middle and rerun resumes and is bit-identical to an
uninterrupted run. (tests/test_smollm2_quality.py checks the quality of the output; the two are in separate files so
that the test workers run them at the same time.) The model is built once from its registry package
(``tiny_models.smollm2_dir``).
"""

import json

import torch
from safetensors.torch import load_file

from smollm2_cli import BLOCKS, quant_args, quant_cli
from tiny_models import needs_shared, run_quant_killed_after, smollm2_dir

pytestmark = needs_shared


def test_smollm2_boa_2bit_kill_and_resume_is_bit_identical(tmp_path):
    from transformers import AutoConfig
    smollm2 = smollm2_dir()
    cfg = AutoConfig.from_pretrained(smollm2)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (BLOCKS, 576, 9, 3)
    minmax = ("--qparam", "minmax")
    ref = tmp_path / "ref"
    r = quant_cli(*quant_args(smollm2, ref, *minmax))
    assert r.returncode == 0, r.stderr
    report = json.loads((ref / "quant_report.json").read_text())
    assert len(report["blocks"]) == BLOCKS

    # killed in the middle, rerun with the same command: resumes and gives the same bits
    out = tmp_path / "out"
    done = run_quant_killed_after(quant_args(smollm2, out, *minmax), out, 8)
    assert 8 <= done < BLOCKS, "kill the run in the middle"
    r = quant_cli(*quant_args(smollm2, out, *minmax))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert json.loads((out / "quant_report.json").read_text())["resumed_from_block"] == done
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
