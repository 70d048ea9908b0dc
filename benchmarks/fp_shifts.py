"""Sizes of the fp-target corrections of a run (``--fp-targets``): for every corrected layer
``||W' - W|| / ||W||`` (``solvers.target``), read from the run state's manifest
(``OUTPUT/quant_state/manifest.json``). Prints the quantiles, the layers beyond ``--fp-max-shift``
(solved on both targets: both objectives and which won) and the largest corrections.

    python benchmarks/fp_shifts.py benchmarks/_work/quality/smollm2-135m-ref/boa-turbo-auto-cap-w2-n32-s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def shifts_of(run: Path) -> list[tuple[int, str, dict]]:
    """``(block, layer, info)`` of every corrected layer, ``info`` holding at least ``fp_shift``."""
    manifest = json.loads((run / "quant_state" / "manifest.json").read_text())
    rows = []
    for i, b in manifest["blocks"].items():
        for lay in b.get("layers", []):
            if "fp_shift" in lay.get("info", {}):
                rows.append((int(i), lay["name"], lay["info"]))
    return sorted(rows, key=lambda r: (r[0], r[1]))


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
        sh = sorted(info["fp_shift"] for _, _, info in rows)
        q = {p: sh[round(p / 100 * (len(sh) - 1))] for p in (50, 90, 99, 100)}
        print(f"{run.name}: {len(rows)} corrected layers; shift quantiles "
              + ", ".join(f"{p}%: {v:.4f}" for p, v in q.items()))
        for b, n, info in rows:
            if "fp_bounded_kept" in info:
                print(f"  block {b} {n}: shift {info['fp_shift']:.3f}, solved on both targets: objective "
                      f"{info['fp_loss_full']:.5g} (full) vs {info['fp_loss_bounded']:.5g} (bounded, alpha "
                      f"{info['fp_alpha_bounded']:.4f}): kept the {'bounded' if info['fp_bounded_kept'] else 'full'}")
            elif "fp_alpha_applied" in info and info["fp_alpha_applied"] < max(r[2].get("fp_alpha_applied", 0)
                                                                                for r in rows):
                print(f"  block {b} {n}: shift {info['fp_shift']:.3f}, alpha scaled down to "
                      f"{info['fp_alpha_applied']:.4f} (the first bound of this session's code, 792d4f9)")
        for b, n, info in sorted(rows, key=lambda r: -r[2]["fp_shift"])[:args.top]:
            print(f"  block {b:2d} {n:18s} shift {info['fp_shift']:.4f}")


if __name__ == "__main__":
    main()
