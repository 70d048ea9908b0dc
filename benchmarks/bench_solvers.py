"""Wall time of the pure-tensor solvers (RTN, GPTQ, BoA) on one projection, fast vs reference.

Shapes: an OPT-125M-like projection (768 x 768, 12 heads of 64) and a Llama-7B-like one
(4096 x 4096, 32 heads of 128). Hessians come from random activations with outlier
channels (H_col = X X^T) and random keys (H_row = K_h^T K_h); weights are N(0, 0.02).

    python benchmarks/bench_solvers.py                         # both shapes, everything
    python benchmarks/bench_solvers.py --shapes opt125m        # quick
    python benchmarks/bench_solvers.py --json out.json

Prints a markdown table (the one in docs/performance.md) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmem_boa.solvers import (boa_quantize, boa_reference, gptq_quantize, gptq_reference,  # noqa: E402
                                rtn_quantize)

SHAPES = {
    "opt125m": dict(d=768, heads=12, tokens=4096),
    "llama7b": dict(d=4096, heads=32, tokens=8192),
}


def make_problem(d: int, heads: int, tokens: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ch = torch.exp(torch.randn(d, 1, generator=g))
    X = ch * torch.randn(d, tokens, generator=g)
    H_col = (X @ X.T) / tokens
    dh = d // heads
    Wk = torch.randn(d, d, generator=g) * 0.02
    K = (Wk @ X).reshape(heads, dh, tokens)
    H_row = (K @ K.transpose(1, 2)) / tokens
    W = torch.randn(d, d, generator=g) * 0.02
    return W.to(device), H_col.to(device), H_row.to(device)


def timed(fn, repeats: int, device: str):
    times, out = [], None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="opt125m,llama7b")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--grids", default="hessian,minmax")
    ap.add_argument("--repeats", type=int, default=3, help="median over repeats (1 for llama7b)")
    ap.add_argument("--no-reference", action="store_true", help="skip the slow column-by-column references")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    rows = []
    env = dict(torch=torch.__version__, threads=torch.get_num_threads(), python=platform.python_version(),
               machine=platform.machine(), device=args.device)
    print(f"# torch {env['torch']}, {env['threads']} threads, device {args.device}", flush=True)
    for shape in args.shapes.split(","):
        cfg = SHAPES[shape]
        W, H_col, H_row = make_problem(cfg["d"], cfg["heads"], cfg["tokens"], args.device)
        reps = args.repeats if shape == "opt125m" else 1
        for grid in args.grids.split(","):
            t_rtn, _ = timed(lambda: rtn_quantize(W, args.bits, grid=grid, H_col=H_col), reps, args.device)
            t_gptq, g = timed(lambda: gptq_quantize(W, H_col, args.bits, grid=grid), reps, args.device)
            t_boa, b = timed(lambda: boa_quantize(W, H_col, H_row, cfg["heads"], args.bits, grid=grid),
                             reps, args.device)
            row = dict(shape=shape, d=cfg["d"], heads=cfg["heads"], grid=grid, bits=args.bits,
                       rtn_s=t_rtn, gptq_s=t_gptq, boa_s=t_boa, boa_over_gptq=t_boa / t_gptq)
            if not args.no_reference and grid == args.grids.split(",")[0]:
                t_gr, gr = timed(lambda: gptq_reference(W, H_col, args.bits, grid=grid), 1, args.device)
                t_br, br = timed(lambda: boa_reference(W, H_col, H_row, cfg["heads"], args.bits, grid=grid),
                                 1, args.device)
                row.update(gptq_ref_s=t_gr, boa_ref_s=t_br,
                           gptq_max_abs_diff=float((g.Q - gr.Q).abs().max()),
                           boa_max_abs_diff=float((b.Q - br.Q).abs().max()),
                           gptq_codes_differ=int((g.codes != gr.codes).sum()),
                           boa_codes_differ=int((b.codes != br.codes).sum()))
            rows.append(row)
            print(json.dumps(row), flush=True)

    print("\n| shape | grid | RTN (s) | GPTQ (s) | BoA (s) | BoA / GPTQ | GPTQ ref (s) | BoA ref (s) "
          "| max abs diff fast vs ref (GPTQ / BoA) | codes differing (GPTQ / BoA) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = ("| {gptq_ref_s:.2f} | {boa_ref_s:.2f} | {gptq_max_abs_diff:.2e} / {boa_max_abs_diff:.2e} "
               "| {gptq_codes_differ} / {boa_codes_differ} |".format(**r)) if "boa_ref_s" in r else "| – | – | – | – |"
        print(f"| {r['shape']} ({r['d']}x{r['d']}, {r['heads']} heads) | {r['grid']} | {r['rtn_s']:.3f} "
              f"| {r['gptq_s']:.3f} | {r['boa_s']:.3f} | {r['boa_over_gptq']:.2f} " + ref)
    if args.json:
        args.json.write_text(json.dumps(dict(env=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
