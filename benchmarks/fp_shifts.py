"""Sizes of the fp-target corrections of a run (``--fp-targets``): for every corrected layer
``||W' - W|| / ||W||`` (``solvers.target``) without and with the bound of ``--fp-max-shift``, read from
the run state's manifest (``OUTPUT/quant_state/manifest.json``) or a quality-benchmark row. Prints the
quantiles, the layers the bound acted on, and the largest corrections.

    python benchmarks/fp_shifts.py benchmarks/_work/quality/smollm2-135m-ref/boa-turbo-auto-cap-w2-n32-s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def shifts_of(run: Path) -> list[tuple[int, str, float, float, float]]:
    """``(block, layer, shift, shift applied, extra damping of the bound)`` of every corrected layer."""
    manifest = json.loads((run / "quant_state" / "manifest.json").read_text())
    rows = []
    for i, b in manifest["blocks"].items():
        for lay in b.get("layers", []):
            info = lay.get("info", {})
            if "fp_shift" in info:
                shift = float(info["fp_shift"])     # (runs before the bound: no applied shift or ridge)
                rows.append((int(i), lay["name"], shift, float(info.get("fp_shift_applied", shift)),
                             float(info.get("fp_ridge", 0.0))))
    return sorted(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="output directories of runs (with quant_state/)")
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args(argv)
    for run in args.runs:
        rows = shifts_of(run)
        if not rows:
            print(f"{run}: no corrected layers recorded")
            continue
        sh = sorted(r[2] for r in rows)
        q = {p: sh[round(p / 100 * (len(sh) - 1))] for p in (50, 90, 99, 100)}
        bounded = [r for r in rows if r[4] > 0]
        print(f"{run.name}: {len(rows)} corrected layers; shift quantiles "
              + ", ".join(f"{p}%: {v:.4f}" for p, v in q.items()))
        print("  bounded: " + (", ".join(f"block {b} {n} (shift {s:.3f} -> {a:.3f}, extra damping {r:.3g} of mean "
                                         f"diag H)" for b, n, s, a, r in bounded) or "none"))
        for b, n, s, a, r in sorted(rows, key=lambda r: -r[2])[:args.top]:
            print(f"  block {b:2d} {n:18s} shift {s:.4f} applied {a:.4f}")


if __name__ == "__main__":
    main()
