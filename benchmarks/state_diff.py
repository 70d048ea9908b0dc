"""Where two runs' quantized blocks first differ: compares the run states (``OUTPUT/quant_state/
block_NNNN.safetensors``: codes, scales, zero points of every layer) of two runs block by block and
prints, per block, which tensors differ and by how much. Runs of the same configuration at one commit
are bit-identical (resume and rerun tests), so a difference between two commits' runs names the first
block and layer whose numbers the code change moved — a last-bit difference in a scale that grows into
different codes in the blocks after it is summation order, not a changed method.

Used to find what moved the reference rows between commits (docs/results.md, "Why the reference rows
moved between commits"): run the same ``run_quant.py`` command at two commits (``git worktree add``),
stop each after a few blocks, and compare::

    python benchmarks/state_diff.py RUN_A RUN_B [--blocks 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file


def block_files(run: Path) -> dict[int, Path]:
    """``block index -> file`` of a run's finished blocks."""
    state = run / "quant_state"
    if not state.is_dir():
        raise SystemExit(f"{run}: no quant_state/ (not a run directory)")
    return {int(p.stem.split("_")[1]): p for p in sorted(state.glob("block_*.safetensors"))}


def compare_block(fa: dict[str, torch.Tensor], fb: dict[str, torch.Tensor]) -> dict:
    """Keys only one side has, and for every shared tensor that differs: dtype, shape, the largest
    absolute difference and the fraction of entries that differ."""
    out = {"only": sorted(set(fa) ^ set(fb)), "differ": {}}
    for k in sorted(set(fa) & set(fb)):
        a, b = fa[k], fb[k]
        if a.shape != b.shape:
            out["differ"][k] = {"shape": (tuple(a.shape), tuple(b.shape))}
        elif not torch.equal(a, b):
            d = (a.double() - b.double()).abs()
            out["differ"][k] = {"dtype": str(a.dtype).replace("torch.", ""), "shape": tuple(a.shape),
                                "max_abs": d.max().item(), "frac": (a != b).double().mean().item()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--blocks", type=int, default=None, help="compare only the first N blocks")
    args = ap.parse_args(argv)
    a, b = block_files(args.run_a), block_files(args.run_b)
    shared = sorted(set(a) & set(b))
    if args.blocks is not None:
        shared = [i for i in shared if i < args.blocks]
    if not shared:
        raise SystemExit("the two runs have no finished block in common")
    first = None
    for i in shared:
        res = compare_block(load_file(str(a[i])), load_file(str(b[i])))
        n = len(res["differ"]) + len(res["only"])
        print(f"block {i}: " + ("identical" if not n else f"{len(res['differ'])} tensors differ"
                                + (f", {len(res['only'])} on one side only" if res["only"] else "")))
        for k, v in res["differ"].items():
            if "max_abs" in v:
                print(f"    {k} {v['dtype']} {v['shape']}: max |a-b| {v['max_abs']:.3g}, {100 * v['frac']:.1f} % of entries")
            else:
                print(f"    {k}: shapes {v['shape'][0]} vs {v['shape'][1]}")
        if n and first is None:
            first = i
    print("identical in every compared block" if first is None else f"first difference: block {first}")


if __name__ == "__main__":
    main()
