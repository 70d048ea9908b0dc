"""Load a GPTQ checkpoint with GPTQModel and measure what it computes (runs inside GPTQModel's venv).

Driven by ``benchmarks/gptqmodel_check.py``, which makes the exports and the token windows:

    VENV/bin/python benchmarks/gptqmodel_eval.py --model EXPORT_DIR --windows ids.pt --out result.json \
        [--weights dequant.safetensors]

GPTQModel's own torch kernel (``BACKEND.TORCH``, the one that runs on a CPU) in float16 or bfloat16 (its
kernels take no float32). Writes the perplexity of the windows (non-overlapping, each scored on all
its next-token predictions, as ``run_eval.py``) and, with ``--weights``, every quantized layer's weight
as GPTQModel dequantizes it (float32, ``nn.Linear`` orientation), for a bit-level comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", required=True, help="torch.save'd (N, L) LongTensor of token ids")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args(argv)
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    t0 = time.perf_counter()
    model = GPTQModel.load(args.model, backend=BACKEND.TORCH, device="cpu", dtype=getattr(torch, args.dtype))
    load_s = time.perf_counter() - t0
    hf = model.model
    kernels = sorted({type(m).__name__ for m in hf.modules() if hasattr(m, "qweight")})
    if args.weights:
        from safetensors.torch import save_file
        deq = {}
        for name, m in hf.named_modules():
            if hasattr(m, "qweight") and hasattr(m, "dequantize_weight"):
                w = m.dequantize_weight()
                w = w.T if w.shape[0] == m.in_features and w.shape[1] == m.out_features else w
                deq[f"{name}.weight"] = w.float().contiguous()
        save_file(deq, args.weights)
    ids = torch.load(args.windows)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in ids:
            logits = hf(input_ids=w.unsqueeze(0)).logits.float()[0]
            lp = torch.log_softmax(logits[:-1].double(), dim=-1)
            nll -= float(lp.gather(1, w[1:].unsqueeze(1)).sum())
            count += w.numel() - 1
    out = {"ppl": math.exp(nll / count), "tokens": count, "windows": int(ids.shape[0]), "dtype": args.dtype,
           "kernels": kernels, "gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
           "load_seconds": load_s, "eval_seconds": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
