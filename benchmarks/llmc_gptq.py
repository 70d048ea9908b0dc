"""GPTQ from llm-compressor (an established implementation) on the same model and calibration data.

Runs inside its own virtualenv (llmcompressor 0.14 pins transformers <= 5.17); created and driven by
``benchmarks/quality.py``. Weight-only, per-channel (or ``--group-size``), asymmetric, MinMax observer (llm-compressor's
GPTQ grid), dampening 0.01, block 128, no act-order. The calibration windows are the very token ids
our pipeline used (saved by quality.py). The result is written as a plain fake-quantized checkpoint
(quantized-dequantized weights, no quantization_config) for the same evaluator as ours.

    VENV/bin/python benchmarks/llmc_gptq.py --model DIR --calib ids.pt --bits 2 --out OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="torch.save'd (N, L) LongTensor of token ids")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=None, help="groups of this many columns (default per channel)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    import llmcompressor

    ids = torch.load(args.calib)
    n, L = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    keep = set(model.state_dict().keys())
    strategy = {"strategy": "group", "group_size": args.group_size} if args.group_size else {"strategy": "channel"}
    recipe = GPTQModifier(
        ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder=None,
        config_groups={"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                   "weights": {"num_bits": args.bits, "type": "int", "symmetric": False,
                                               "observer": "minmax", "dynamic": False, **strategy}}})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=L, num_calibration_samples=n)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k in keep}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (Path(args.model) / f).is_file():
            shutil.copyfile(Path(args.model) / f, out / f)
    (out / "llmc_info.json").write_text(json.dumps({"seconds": seconds, "llmcompressor": llmcompressor.__version__,
                                                    "nsamples": n, "seqlen": L, "bits": args.bits,
                                                    "group_size": args.group_size}))
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
