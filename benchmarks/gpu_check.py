"""GPU readiness: the scale benchmark on CUDA, the allocator's peaks per phase against the plan and the ledger.

    python benchmarks/gpu_check.py                          # 14GiB budget, BoA block_v, 2 blocks, 8 x 2048
    python benchmarks/gpu_check.py --budget 14GiB --runs boa,gptq --blocks 2

Needs a CUDA device (exits with a message otherwise; CI never runs it). Writes a synthetic
Llama-2-7B-dimension checkpoint with ``--ckpt-blocks`` blocks (random weights: memory and time only,
never quality), quantizes ``--blocks`` of them with ``benchmarks/scale.py``'s instrumented child
process on ``--device cuda --max-gpu-mem BUDGET``, and prints per phase: the plan's predicted peak,
the ledger's peak and ``torch.cuda.max_memory_allocated`` (reset at every phase start by the ledger),
with a flag where the allocator went above the plan or the budget. Raw rows go to
``benchmarks/results/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import scale  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="14GiB")
    ap.add_argument("--runs", default="boa,gptq,boa-noblockv")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--ckpt-blocks", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--qparam", default="minmax")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device; none here (nothing was run)")
        return 1
    ckpt = scale.WORK / f"llama2-7b-synth-{args.ckpt_blocks}"
    if not (ckpt / "model.safetensors.index.json").is_file():
        from synth_checkpoint import write_synthetic
        write_synthetic(REPO / "configs" / "llama-2-7b.json", ckpt, blocks=args.ckpt_blocks,
                        tokenizer=REPO.parent / "shared" / "models" / "llama-wt2-9m")
    rows = {}
    for label in args.runs.split(","):
        out, result = scale.WORK / f"gpu-{label}", scale.WORK / f"gpu-{label}.json"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        flags = ["--model", str(ckpt), "--wbits", "2", "--nsamples", str(args.nsamples), "--seqlen", "2048",
                 "--calib", "wikitext2", "--data-dir", str(scale.DATA), "--device", "cuda", "--max-gpu-mem",
                 args.budget, "--qparam", args.qparam, "--no-progress", *scale.RUNS[label]]
        subprocess.run(scale._child_cmd(label, flags, out, args.blocks, result), check=True, cwd=REPO)
        row = json.loads(result.read_text())
        row["device_name"] = torch.cuda.get_device_name()
        rows[label] = row
        planned = {k: v["total_bytes"] for k, v in row["plan"]["phases"].items()}
        print(f"\n### {label} on {row['device_name']}, --max-gpu-mem {args.budget}: {row['seconds']:.0f} s for "
              f"{args.blocks} blocks\n")
        print("| phase | planned (GiB) | ledger peak (GiB) | torch.cuda.max_memory_allocated (GiB) | allocator / plan |")
        print("|---|---|---|---|---|")
        budget = row["budget"]
        for name, p in row["ledger_phases"].items():
            cuda, plan = p["device_peak_bytes"], planned.get(name)
            flag = " **above budget**" if cuda and cuda > budget else (" above plan" if cuda and plan and cuda > plan else "")
            print(f"| {name} | {plan / 2 ** 30 if plan else float('nan'):.2f} | {p['ledger_peak_bytes'] / 2 ** 30:.2f} | "
                  f"{(cuda or 0) / 2 ** 30:.2f} | {cuda / plan if cuda and plan else float('nan'):.2f}{flag} |")
    out = REPO / "benchmarks" / "results" / "gpu_check.json"
    out.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
