"""Sizes of the fp-target corrections of a run (``--fp-targets``): for every corrected layer
``||alpha Z|| / ||W||`` (``solvers.target``) and the alpha applied under ``--fp-max-shift``, read from
the run state's manifest (``OUTPUT/quant_state/manifest.json``) or a quality-benchmark row. Prints the
quantiles, the layers whose alpha was scaled down, and the largest corrections.

    python benchmarks/fp_shifts.py benchmarks/_work/quality/smollm2-135m-ref/boa-turbo-auto-cap-w2-n32-s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def shifts_of(run: Path) -> tuple[float, list[tuple[int, str, float, float]]]:
    """The run's ``--fp-alpha`` and ``(block, layer, shift, alpha applied)`` of every corrected layer."""
    manifest = json.loads((run / "quant_state" / "manifest.json").read_text())
    rows = []
    for i, b in manifest["blocks"].items():
        for lay in b.get("layers", []):
            info = lay.get("info", {})
            if "fp_shift" in info:
                rows.append((int(i), lay["name"], float(info["fp_shift"]), float(info["fp_alpha_applied"])))
    return float(manifest["config"].get("fp_alpha", 1.0)), sorted(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="output directories of runs (with quant_state/)")
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args(argv)
    for run in args.runs:
        alpha, rows = shifts_of(run)
        if not rows:
            print(f"{run}: no corrected layers recorded")
            continue
        sh = sorted(r[2] for r in rows)
        q = {p: sh[round(p / 100 * (len(sh) - 1))] for p in (50, 90, 99, 100)}
        bounded = [r for r in rows if r[3] < alpha]
        print(f"{run.name}: {len(rows)} corrected layers; shift quantiles "
              + ", ".join(f"{p}%: {v:.4f}" for p, v in q.items()))
        print("  alpha scaled down in: " + (", ".join(f"block {b} {n} (shift {s:.3f} -> alpha {a:.4f})"
                                                      for b, n, s, a in bounded) or "none"))
        for b, n, s, a in sorted(rows, key=lambda r: -r[2])[:args.top]:
            print(f"  block {b:2d} {n:18s} shift {s:.4f} alpha {a:.4f}")


if __name__ == "__main__":
    main()
