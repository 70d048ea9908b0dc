"""Same quantization under different --max-gpu-mem budgets: wall time, peak RSS, ledger peak, chunks.

    python benchmarks/budget_rss.py [--model llama-wt2-9m] [--budgets default,1GiB,256MiB]

On a CPU-only machine the compute device *is* host RAM: the planner fills whatever budget it is
given with larger chunks (fewer passes), so a run's RSS follows the budget. Each run is a separate
``run_quant.py`` process (BoA, W2, 128 x 512 WikiText-2 calibration tokens), measured like
benchmarks/quality.py does; the quantized weights are compared with the first run's (chunking
changes the float32 summation order of the Hessians, which can flip rounding decisions).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import run_measured  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--model", default="llama-wt2-9m")
    ap.add_argument("--budgets", default="default,1GiB,256MiB")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows, ref = [], None
    for budget in args.budgets.split(","):
        out = args.work / f"budget-{args.model}-{budget}"
        cmd = [sys.executable, str(REPO / "run_quant.py"), "--model", str(args.shared / "models" / args.model),
               "--method", "boa", "--wbits", "2", "--nsamples", "128", "--seqlen", "512", "--seed", "0",
               "--data-dir", str(args.shared / "data"), "--device", "cpu", "--output", str(out),
               "--no-progress"] + ([] if budget == "default" else ["--max-gpu-mem", budget])
        shutil.rmtree(out, ignore_errors=True)   # a fresh run: the same configuration would resume a finished one
        m = run_measured(cmd)
        report = json.loads((out / "quant_report.json").read_text())
        w = load_file(str(out / "model.safetensors"))
        ref = ref or w
        max_diff = max(float((w[k] - ref[k]).abs().max()) for k in w)
        differ = sum(int((w[k] != ref[k]).sum()) for k in w) / sum(w[k].numel() for k in w)
        row = {"budget": budget, "seconds": m["seconds"], "peak_rss_mib": m["peak_rss_bytes"] / 2 ** 20,
               "ledger_peak_mib": report["memory"]["ledger_peak_bytes"] / 2 ** 20,
               "plan_budget_mib": report["plan"].get("budget_bytes", 0) / 2 ** 20,
               "chunk": report["plan"].get("chunk"), "max_abs_weight_diff_vs_first": max_diff,
               "fraction_weights_differing_vs_first": differ}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| --max-gpu-mem | wall time (s) | peak RSS (MiB) | ledger peak (MiB) | chunk | weights differing from "
          "the first run | max abs difference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['ledger_peak_mib']:.0f} | "
              f"{r['chunk']} | {100 * r['fraction_weights_differing_vs_first']:.3f} % | "
              f"{r['max_abs_weight_diff_vs_first']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
