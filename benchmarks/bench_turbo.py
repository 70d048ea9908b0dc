"""Solver time and objective of issue 17's options on one attention projection.

For each configuration: wall time of the pure-tensor solver (median of ``--repeats``) and its
Kronecker objective ``sum_h tr(H_row,h dW_h H_col,h dW_h^T)`` (damped Hessians, as solved) relative
to the paper's BoA (one row at a time, full grid search). Problems as in bench_solvers.py (random
activations with outlier channels, random keys).

    python benchmarks/bench_turbo.py --shapes smollm2 --grids hessian,minmax
    python benchmarks/bench_turbo.py --shapes llama7b --grids minmax --repeats 1     # the sweep alone

Shapes: ``smollm2`` (576 x 576, 9 heads of 64: SmolLM2-135M's q_proj), ``opt125m`` (768, 12 x 64),
``llama7b`` (4096, 32 x 128).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_solvers import make_problem, timed  # noqa: E402
from lowmem_boa.solvers import attention_loss, boa_quantize, gptq_quantize  # noqa: E402
from lowmem_boa.solvers.hessian import add_damping  # noqa: E402

SHAPES = {
    "smollm2": dict(d=576, heads=9, tokens=4096),
    "opt125m": dict(d=768, heads=12, tokens=4096),
    "llama7b": dict(d=4096, heads=32, tokens=8192),
}

# name -> (method, boa_quantize / gptq_quantize keyword arguments)
CONFIGS = {
    "boa (paper)": ("boa", {}),
    "boa N=4": ("boa", {"joint_rows": 4}),
    "boa N=16": ("boa", {"joint_rows": 16}),
    "boa N=32": ("boa", {"joint_rows": 32}),
    "boa coarse 8": ("boa", {"coarse": 8}),
    "boa N=16 coarse 8": ("boa", {"joint_rows": 16, "coarse": 8}),
    "boa follow": ("boa", {"follow_grids": True}),
    "boa refine 1": ("boa", {"refine_sweeps": 1}),
    "boa N=16 coarse 8 follow refine 1": ("boa", {"joint_rows": 16, "coarse": 8, "follow_grids": True,
                                                  "refine_sweeps": 1}),
    "gptq": ("gptq", {}),
    "gptq refine 1": ("gptq", {"refine_sweeps": 1}),
    "gptq coarse 8": ("gptq", {"coarse": 8}),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--grids", default="hessian")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    env = dict(torch=torch.__version__, threads=torch.get_num_threads(), python=platform.python_version(),
               machine=platform.machine(), device=args.device)
    print(f"# torch {env['torch']}, {env['threads']} threads, device {args.device}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        cfg = SHAPES[shape]
        W, H_col, H_row = make_problem(cfg["d"], cfg["heads"], cfg["tokens"], args.device)
        Hc, Hr = H_col.clone(), H_row.clone()
        add_damping(Hc, 0.01)
        add_damping(Hr, 0.01)
        for grid in args.grids.split(","):
            base = None
            for name in args.configs.split(","):
                method, kw = CONFIGS[name]
                if method == "boa":
                    fn = (lambda kw=kw: boa_quantize(W, H_col, H_row, cfg["heads"], args.bits, grid=grid, **kw))
                else:
                    fn = (lambda kw=kw: gptq_quantize(W, H_col, args.bits, grid=grid, **kw))
                t, res = timed(fn, args.repeats, args.device)
                loss = float(attention_loss(W, res.Q, Hc, Hr, torch.float64))
                if base is None:
                    base = (t, loss)
                row = dict(shape=shape, grid=grid, config=name, seconds=t, speedup=base[0] / t,
                           objective_ratio=loss / base[1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n| shape | grid | configuration | seconds | speed-up vs {next(iter(args.configs.split(',')))} "
          "| Kronecker objective / first |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['grid']} | {r['config']} | {r['seconds']:.3f} | {r['speedup']:.2f} "
              f"| {r['objective_ratio']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(dict(env=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
