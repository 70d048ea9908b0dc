"""Projection of a full Llama-2-7B BoA run to real GPUs, from this machine's measured phase efficiencies.

    python benchmarks/projection.py            # reads benchmarks/results/scale.json, writes projection.json

An ESTIMATE, not a measurement. Inputs:

* the planner's arithmetic per phase and block (``Plan.gflop_per_block``) for Llama-2-7B, BoA (block_v on
  in every column but the last, today's default),
  128 x 2048 calibration tokens, the default Hessian grid, float16 (``configs/llama-2-7b.json``);
* per phase, the efficiency measured on this CPU: achieved GFLOP/s in the scale benchmark's BoA run
  (``benchmarks/scale.py``, 7B-dimension blocks) divided by the CPU's float32 matmul peak measured here
  (a 4096^3 product, best of 5). The solve phase's efficiency comes from the Hessian-grid solver on a
  4096 x 4096 projection (``benchmarks/results/bench_solvers.json``: the scale run used a MinMax grid);
* assumption 1: each phase reaches the same fraction of a GPU's peak as of this CPU's: float32 peak for
  statistics and solver (PyTorch does not use TF32 for float32 matmuls by default), float16 tensor peak
  for the block forward (propagate);
* assumption 2: the solvers' sequential column loop has a latency floor on a GPU: ``--step-us``
  microseconds per column step (a few small kernel launches); GPTQ layers take ``C`` steps, BoA's
  q/k/v ``head_dim x C`` (one OPTQ sweep per row index of all heads, docs/performance.md), and with
  BoA's MLP row Hessians (the default at 2 bits) gate/up ``group x C`` (344 rows per group at 7B: the
  largest divisor of 11,008 up to the default 512; 128 before SmolLM2's A/B);
* the one-forward statistics phase (the default since it replaced the four per-group statistics phases
  and the fp stream's propagation) runs at the aggregate efficiency the scale run measured over those
  four phases (their GFLOP over their seconds: the same mix of forward and Gram products);
* the MLP row Hessians' extra statistics (the MLP-input layers' outputs and gain Grams, in the planner's
  FLOP count) run at the MLP-input phase's measured efficiency: the scale run predates them;
* vendor peak numbers (dense, no sparsity): P100 PCIe 9.3 / 18.7, T4 8.1 / 65, A100 SXM 19.5 / 312,
  H100 SXM 67 / 989 TFLOP/s (float32 / float16 tensor).

Not modelled: host<->device copies, disk reads (~13.5 GB once), Python overhead, the evaluation.
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

GPUS = {"P100 (16 GB)": (9.3e3, 18.7e3), "T4 (16 GB)": (8.1e3, 65e3), "A100 (80 GB SXM)": (19.5e3, 312e3),
        "H100 (80 GB SXM)": (67e3, 989e3)}   # GFLOP/s: float32, float16 tensor
FORWARD = "propagate (block forward)"
SOLVE = "solve (per layer)"
PHASE_STATS = "block statistics (one forward)"
PER_GROUP = ("attention statistics", "out-proj statistics", "MLP-input statistics", "MLP-output statistics")


def cpu_peak() -> float:
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 ** 3 / best / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    ap.add_argument("--run", default="boa")
    ap.add_argument("--step-us", type=float, default=20.0)
    ap.add_argument("--joint-rows", type=int, default=16, help="the 'fast' column: BoA rows per sweep")
    ap.add_argument("--grid-coarse", type=int, default=8, help="the 'fast' column: coarse-to-fine grid search")
    ap.add_argument("--mlp-row-group", type=int, default=None,
                    help="BoA's MLP row groups of at most this many rows (default: the product's default)")
    ap.add_argument("--cpu-peak", type=float, default=None,
                    help="this CPU's float32 matmul peak in GFLOP/s, e.g. a previous projection.json's "
                         "cpu_peak_gflops (default: measured now; needs the machine idle)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "projection.json")
    args = ap.parse_args(argv)
    from lowmem_boa.config import QuantConfig
    from lowmem_boa.models import get_adapter
    from lowmem_boa.scheduler import PlanInputs, load_config, make_plan
    from lowmem_boa.scheduler.planner import Dims, search_tries
    from lowmem_boa.stats import mlp_row_group
    adapter = get_adapter(load_config(str(REPO / "configs" / "llama-2-7b.json")))
    group = mlp_row_group(adapter.intermediate_size, args.mlp_row_group or QuantConfig(model="").mlp_row_group)

    def plan_gflop(rows, coarse=1, turbo=False, block_v=True, search=False):
        return make_plan(adapter, PlanInputs(method="boa", calibration=True, nsamples=128, seqlen=2048,
                                             dtype_bytes=2, qparam="hessian", mlp_row_group=rows,
                                             grid_coarse=coarse, fp_targets=turbo, refine_scales=int(turbo),
                                             block_v=block_v, search_orders=search),
                         14 * 2 ** 30, 24 * 2 ** 30).gflop_per_block

    run = json.loads(args.scale.read_text())["runs"][args.run]
    peak = args.cpu_peak or cpu_peak()
    eff = {}
    for r in run["phases"]:       # the last block measured of each phase (block 2 has no tokenization/first-touch)
        if r["gflop_per_s"]:
            eff[r["phase"]] = r["gflop_per_s"] / peak
    per_group = [r for r in run["phases"] if r["phase"] in PER_GROUP and r["gflop_per_s"]]
    if per_group and PHASE_STATS not in eff:   # the last block's four statistics phases, aggregated
        last = {r["phase"]: r for r in per_group}
        eff[PHASE_STATS] = (sum(r["gflop"] for r in last.values()) / sum(r["seconds"] for r in last.values())
                            / peak)
    bench = json.loads((REPO / "benchmarks" / "results" / "bench_solvers.json").read_text())
    row = next(r for r in bench["rows"] if r["d"] == 4096 and r["grid"] == "hessian")
    grid_flop = (2 * 160 + 2) * 4096 ** 3 + 4096 ** 3
    eff[SOLVE] = grid_flop / row["boa_s"] / 1e9 / peak
    h = adapter.heads

    dims = Dims.from_adapter(adapter)

    def steps(rows, joint=1, search=False):   # with --search-orders every try sweeps again (planner.search_tries)
        sweeps = -(-h.head_dim // joint)
        per_row = {adapter.q_proj: sweeps, adapter.k_proj: sweeps, adapter.v_proj: sweeps,
                   **({n: -(-rows // joint) for n in adapter.mlp_in} if rows else {})}
        inp = PlanInputs(method="boa", calibration=True, nsamples=1, seqlen=2, dtype_bytes=2, search_orders=search,
                         mlp_row_group=rows)
        return sum(c * per_row.get(name, 1) * search_tries(dims, inp, i)
                   for i, (name, (r, c)) in enumerate(adapter.linear_shapes().items()))

    def project(gflop, n_steps, fp32, fp16):
        per_phase = {}
        for phase, g in gflop.items():
            rate = (fp16 if phase == FORWARD else fp32) * eff.get(phase, min(eff.values()))
            per_phase[phase] = g / rate
        per_phase[SOLVE] += n_steps * args.step_us * 1e-6
        return per_phase, adapter.n_blocks * sum(per_phase.values()) / 60

    variants = {"default": group, "paper": None}   # BoA's default at 2 bits; the paper's BoA (--no-mlp-row-hessian)
    gflop = plan_gflop(group)
    N, K = args.joint_rows, args.grid_coarse
    # issue 17's configuration: joint rows, coarse grid, and the corrections (fp stream, refinement)
    # today's default BoA: that configuration without block_v (V on the shared X X^T; the same row sweeps)
    turbo = dict(fast=(plan_gflop(group, K), steps(group, N)), turbo_fast=(plan_gflop(group, K, True), steps(group, N)),
                 default_now=(plan_gflop(group, K, True, block_v=False), steps(group, N)),
                 default_search=(plan_gflop(group, K, True, block_v=False, search=True), steps(group, N, search=True)))
    out = {"cpu_peak_gflops": peak, "efficiency": eff, "mlp_row_group": group, "step_us": args.step_us,
           "joint_rows": N, "grid_coarse": K,
           "gflop_per_block": {k: plan_gflop(v) for k, v in variants.items()} | {k: g for k, (g, _) in turbo.items()},
           "sequential_steps_per_block": {k: steps(v) for k, v in variants.items()} | {k: n for k, (_, n) in turbo.items()},
           "gpus": {}}
    for gpu, (fp32, fp16) in GPUS.items():
        per_phase, total = project(gflop, steps(group), fp32, fp16)
        _, total_paper = project(plan_gflop(None), steps(None), fp32, fp16)
        out["gpus"][gpu] = {"seconds_per_block": per_phase, "minutes_total": total,
                            "minutes_total_paper_boa": total_paper,
                            **{f"minutes_total_{k}": project(g, n, fp32, fp16)[1] for k, (g, n) in turbo.items()}}
    args.out.write_text(json.dumps(out, indent=1))
    print(f"CPU float32 matmul peak here: {peak:.0f} GFLOP/s; efficiencies: "
          + ", ".join(f"{k} {v:.2f}" for k, v in eff.items()))
    print(f"MLP row groups of {group}; GFLOP per block: "
          + ", ".join(f"{k} {v:,.0f}" for k, v in gflop.items())
          + f"; sequential column steps per block: {steps(group):,} ({steps(None):,} for the paper's BoA)")
    print("\n| GPU | " + " | ".join(gflop) + " | total, 32 blocks | paper's BoA (--no-mlp-row-hessian) "
          f"| --joint-rows {N} --grid-coarse {K} | the same + --fp-targets --refine-scales 1 "
          "| the same, --no-block-v (today's default) | the same + --search-orders |")
    print("|---|" + "---|" * (len(gflop) + 6))
    for gpu, v in out["gpus"].items():
        print(f"| {gpu} | " + " | ".join(f"{v['seconds_per_block'][p]:.1f} s" for p in gflop)
              + f" | **{v['minutes_total']:.0f} min** | {v['minutes_total_paper_boa']:.0f} min "
              f"| {v['minutes_total_fast']:.0f} min | {v['minutes_total_turbo_fast']:.0f} min "
              f"| **{v['minutes_total_default_now']:.0f} min** | {v['minutes_total_default_search']:.0f} min |")

if __name__ == "__main__":
    main()
