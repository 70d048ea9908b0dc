"""Quality of RTN / GPTQ / BoA on the real checkpoints in ../shared/models (CPU is enough).

For every model x method x bit width: quantize with the streaming pipeline (library API, same
code as run_quant.py), then measure on held-out text

* perplexity on WikiText-2 test (GPTQ protocol, non-overlapping --seqlen windows),
* the per-block attention-output error ||MHA_q(X) - MHA_fp(X)||^2 / ||MHA_fp(X)||^2 on
  WikiText-2 *validation* windows (X = the original model's block inputs), which is what BoA's
  attention-aware Hessians target,
* quantization wall time and the device-memory ledger peak.

    python benchmarks/quality.py --out benchmarks/results/quality.json
    python benchmarks/quality.py --models llama-wt2-9m --bits 2 --methods gptq,boa   # quick

Methods: rtn (MinMax grid, no data), gptq (Hessian grid), boa (Hessian grid, block_v),
boa-noblockv (shared X X^T for V). Everything else at the pipeline defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmem_boa.config import QuantConfig, RunOptions  # noqa: E402
from lowmem_boa.data import eval_windows, load_source  # noqa: E402
from lowmem_boa.eval import attention_output_errors, streaming_nll  # noqa: E402
from lowmem_boa.pipeline import quantize_model  # noqa: E402
from lowmem_boa.ui import Console  # noqa: E402

METHODS = {
    "rtn": dict(method="rtn", qparam="minmax"),
    "gptq": dict(method="gptq", qparam="hessian"),
    "boa": dict(method="boa", qparam="hessian", block_v=True),
    "boa-noblockv": dict(method="boa", qparam="hessian", block_v=False),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--models", default="opt-wt2-10m,llama-wt2-9m")
    ap.add_argument("--methods", default="rtn,gptq,boa,boa-noblockv")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn-windows", type=int, default=64, help="held-out validation windows for the attention error")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality.json")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer
    data_dir = str(args.shared / "data")
    device = torch.device("cpu")
    budget = 16 * 2 ** 30
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "runs": []}
    for model in args.models.split(","):
        mdir = args.shared / "models" / model
        tok = AutoTokenizer.from_pretrained(mdir)
        test = eval_windows(tok, load_source("wikitext2", "test", data_dir), args.seqlen)
        held = eval_windows(tok, load_source("wikitext2", "valid", data_dir), args.seqlen, args.attn_windows)
        fp = streaming_nll(mdir, test, device, budget)
        print(f"{model} fp32: wikitext2 ppl {fp['ppl']:.3f} ({fp['windows']} windows)", flush=True)
        results["runs"].append(dict(model=model, method="fp32", bits=16, wikitext2_ppl=fp["ppl"], windows=fp["windows"]))
        for method in args.methods.split(","):
            for bits in map(int, args.bits.split(",")):
                out = args.work / f"{model}-{method}-w{bits}"
                qc = QuantConfig(model=str(mdir), wbits=bits, nsamples=args.nsamples, seqlen=args.seqlen,
                                 seed=args.seed, **METHODS[method])
                ro = RunOptions(output=str(out), device="cpu", data_dir=data_dir, overwrite=True, progress=False)
                t0 = time.perf_counter()
                report = quantize_model(qc, ro, Console(progress=False))
                seconds = time.perf_counter() - t0
                ppl = streaming_nll(out, test, device, budget)
                att = attention_output_errors(mdir, out, held, device, budget)
                row = dict(model=model, method=method, bits=bits, wikitext2_ppl=ppl["ppl"],
                           attn_rel_error=[a["rel_error"] for a in att], quant_seconds=seconds,
                           ledger_peak_bytes=report["memory"]["ledger_peak_bytes"],
                           layer_rel_errors={b: [l["rel_error"] for l in v["layers"]] for b, v in report["blocks"].items()})
                results["runs"].append(row)
                print(f"{model} {method} W{bits}: ppl {ppl['ppl']:.3f} · attn err "
                      + " ".join(f"{e:.4f}" for e in row["attn_rel_error"]) + f" · {seconds:.1f} s", flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
    print()
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| model | method | bits | WikiText-2 PPL | attention-output error per block (rel.) | mean | time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if r["method"] == "fp32":
            lines.append(f"| {r['model']} | fp32 | 32 | {r['wikitext2_ppl']:.3f} | – | – | – |")
            continue
        errs = r["attn_rel_error"]
        lines.append(f"| {r['model']} | {r['method']} | {r['bits']} | {r['wikitext2_ppl']:.3f} | "
                     + " / ".join(f"{e:.4f}" for e in errs) + f" | {sum(errs) / len(errs):.4f} | {r['quant_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
