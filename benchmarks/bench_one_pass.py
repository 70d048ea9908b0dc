"""One-forward block statistics against the per-group phases they replaced, on SmolLM2-135M's blocks.

    OMP_NUM_THREADS=1 python benchmarks/bench_one_pass.py                       # 16 x 2048, BoA default, 3 blocks
    OMP_NUM_THREADS=1 python benchmarks/bench_one_pass.py --nsamples 32 --seqlen 512 --method gptq

Both runs quantize the first ``--blocks`` blocks of SmolLM2-135M (a copy of the checkpoint cut to
that many blocks, in ``benchmarks/_work``) with the same options in this one process, one after
the other: first with the per-group statistics (attention, out-proj, MLP input, MLP output and,
with fp targets, the fp stream's propagation: each its own partial forward per chunk, as before
the one-forward pass), then with today's one-forward pass. Prints the statistics seconds per
block of each (the mean over blocks after the first, which pays the first-touch costs), the whole
block's seconds and whether the two checkpoints are bit-identical (they must be).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lowmem_boa import block as block_mod  # noqa: E402
from lowmem_boa.config import QuantConfig, RunOptions  # noqa: E402
from lowmem_boa.pipeline import quantize_model  # noqa: E402
from lowmem_boa.scheduler.planner import (PHASE_BLOCK_V, PHASE_MLP_IN, PHASE_MLP_OUT, PHASE_OUT,  # noqa: E402
                                          PHASE_PROPAGATE)
from lowmem_boa.ui import Console  # noqa: E402

NOT_STATS = {PHASE_BLOCK_V, PHASE_PROPAGATE, "solve (per layer)"}


def per_group(self, blk, store):
    """The statistics as computed before the one-forward pass (the per-group phases)."""
    a = self.adapter
    if self.qc.fp_targets:
        self.propagate(blk, store, fp=True)
    H_qkv, C_qkv, rows = self.attention_statistics(blk, store)
    gains = {a.mlp_in[0]: self.plan.inputs.mlp_row_group}
    early = {name: self._column_hessian(blk, store, name, phase, gains.get(name))
             for name, phase in ((a.o_proj, PHASE_OUT), (a.mlp_in[0], PHASE_MLP_IN), (a.mlp_out, PHASE_MLP_OUT))}
    return H_qkv, C_qkv, rows, early


def cut_model(src: Path, dst: Path, blocks: int) -> Path:
    if (dst / "config.json").exists():
        return dst
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(src, num_hidden_layers=blocks, dtype=torch.float32)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def run(model: Path, out: Path, args) -> tuple[dict, float]:
    qc = QuantConfig(model=str(model), method=args.method, wbits=2, nsamples=args.nsamples, seqlen=args.seqlen)
    ro = RunOptions(output=str(out), device="cpu", data_dir=str(args.shared / "data"), progress=False)
    t0 = time.perf_counter()
    report = quantize_model(qc, ro, Console(progress=False))
    return report, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(os.environ.get(
        "LOWMEM_BOA_SMOLLM2", Path.home() / ".cache" / "lowmem_boa" / "smollm2-135m")))
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--method", default="boa")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "one_pass")
    ap.add_argument("--json", type=Path, default=None, help="append the result to this file")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model} has no config.json: build SmolLM2 first (../shared/models/smollm2-135m/build.py)")
    args.work.mkdir(parents=True, exist_ok=True)
    model = cut_model(args.model, args.work / f"smollm2-{args.blocks}blocks", args.blocks)
    tag = f"{args.method}-n{args.nsamples}-L{args.seqlen}"
    results = {}
    new_impl = block_mod.BlockQuantizer.one_pass_statistics
    old_ws = block_mod.BlockQuantizer._workspace
    for name in ("per-group", "one-forward"):
        out = args.work / f"{tag}-{name}"
        if out.exists():
            import shutil
            shutil.rmtree(out)
        if name == "per-group":
            block_mod.BlockQuantizer.one_pass_statistics = per_group
            block_mod.BlockQuantizer._workspace = lambda self, ph: old_ws(self, ph) if self._planned(ph) \
                else self.sch.workspace(f"workspace: {ph}", 0)
        else:
            block_mod.BlockQuantizer.one_pass_statistics = new_impl
            block_mod.BlockQuantizer._workspace = old_ws
        report, wall = run(model, out, args)
        blocks = [report["blocks"][str(b)] for b in range(1, args.blocks)] or [report["blocks"]["0"]]
        stats = [sum(v for k, v in b["phase_seconds"].items() if k not in NOT_STATS) for b in blocks]
        results[name] = {"statistics_s_per_block": statistics.fmean(stats),
                         "block_s": statistics.fmean(b["seconds"] for b in blocks),
                         "phases": blocks[-1]["phase_seconds"], "wall_s": wall}
        print(f"{name:>12}: statistics {results[name]['statistics_s_per_block']:.1f} s/block, "
              f"block {results[name]['block_s']:.1f} s, run {wall:.0f} s", flush=True)
    from safetensors.torch import load_file
    a = load_file(args.work / f"{tag}-per-group" / "model.safetensors")
    b = load_file(args.work / f"{tag}-one-forward" / "model.safetensors")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    speed = results["per-group"]["statistics_s_per_block"] / results["one-forward"]["statistics_s_per_block"]
    print(f"statistics {speed:.2f}x faster; block {results['per-group']['block_s'] / results['one-forward']['block_s']:.2f}x;"
          f" checkpoints bit-identical: {identical}")
    row = {"tag": tag, "threads": torch.get_num_threads(), **results, "speedup_statistics": speed,
           "identical": identical, "command": "python benchmarks/bench_one_pass.py " + " ".join(argv or sys.argv[1:])}
    if args.json:
        data = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(data + [row], indent=1))
    if not identical:
        sys.exit("the two checkpoints differ")


if __name__ == "__main__":
    main()
