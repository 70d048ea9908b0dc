"""Scale benchmark: Llama-2-7B-sized blocks through the streaming pipeline, measured against the plan.

    python benchmarks/scale.py --study main     # BoA (block_v), GPTQ, BoA --no-block-v; 2 blocks each
    python benchmarks/scale.py --study kill     # kill -9 during block 2 of a BoA run, rerun, finish
    python benchmarks/scale.py --report         # tables from benchmarks/results/scale.json

The checkpoint is synthetic (``benchmarks/synth_checkpoint.py``: Llama-2-7B's config, all 32 blocks,
random float16 weights, 13.5 GB in 7 shards): **random weights test memory and time, never quality**.
Each run is ``run_quant.py``'s own code path (``lowmem_boa.pipeline.quantize_model``) in a fresh
process, on ``--device cpu`` with ``--max-gpu-mem`` / ``--max-cpu-mem`` chosen so that the host budget
is far below the checkpoint and the calibration activations go to the disk memmap. A run stops after
``--blocks`` blocks (quantized, saved and propagated; the rest is what resume would do next).

Inside the run process a sampler thread reads the process RSS (and its anonymous part, RSS minus
file-backed pages such as the memmap and the safetensors mappings) every 50 ms and the disk usage
of the output directory (allocated blocks) every 0.5 s; every ledger phase is timed and its own
ledger peak recorded; every checkpoint read is sized. Per block and phase the row has: planned
device peak and host total, ledger peak, measured RSS peak, seconds, and GFLOP/s against the
planner's arithmetic count (``Plan.gflop_per_block``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

WORK = REPO / "benchmarks" / "_work"
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
CKPT = WORK / "llama2-7b-synth"
DATA = REPO.parent / "shared" / "data"
COMMON = ["--wbits", "2", "--nsamples", "8", "--seqlen", "2048", "--calib", "wikitext2", "--data-dir", str(DATA),
          "--device", "cpu", "--max-gpu-mem", "8GiB", "--max-cpu-mem", "6GiB", "--qparam", "minmax", "--no-progress"]
RUNS = {   # label -> run_quant.py flags (besides --model/--output)
    "boa": ["--method", "boa", "--block-v"],      # block_v was the default when these runs were measured
    "gptq": ["--method", "gptq"],
    "boa-noblockv": ["--method", "boa", "--no-block-v"],
    "boa-hessian-grid": ["--method", "boa", "--qparam", "hessian", "--block-v"],
}


class _StopBench(Exception):
    pass


def _disk_usage(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


# ----------------------------------------------------------------------------------------------
# the measured run (child process)
# ----------------------------------------------------------------------------------------------
def child(label: str, flags: list[str], out: Path, blocks: int, result: Path) -> None:
    import torch

    from lowmem_boa import pipeline
    from lowmem_boa.checkpoint import RunState
    from lowmem_boa.cli.quant import parse
    from lowmem_boa.scheduler import CheckpointReader, Ledger, Scheduler

    proc = psutil.Process()
    t_origin = time.perf_counter()
    samples, disk, occurrences, active = [], [], [], []
    reads = {"max_bytes": 0, "max_key": None, "total_bytes": 0, "count": 0}
    state = {"block": -1, "prep": None, "ledger": None, "stop": False}

    def sampler():
        next_disk = 0.0
        while not state["stop"]:
            t = time.perf_counter() - t_origin
            mi = proc.memory_info()
            samples.append((t, mi.rss, mi.rss - mi.shared))
            if t >= next_disk:
                disk.append((t, _disk_usage(out)))
                next_disk = t + 0.5
            time.sleep(0.05)

    # ---- instrumentation (wrappers around the product's own code) ----
    orig_phase, orig_reserve = Ledger.phase, Ledger.reserve
    orig_get, orig_resident = CheckpointReader.get, Scheduler.resident
    orig_prepare, orig_update = pipeline.prepare_run, RunState.update_block_stats
    orig_save, orig_windows = RunState.save_block, pipeline.calibration_windows

    @contextmanager
    def timed(name: str, self=None):
        occ = {"phase": name, "block": state["block"], "t0": time.perf_counter() - t_origin,
               "ledger_peak": self.current if self is not None else None}
        active.append(occ)
        try:
            yield occ
        finally:
            occ["t1"] = time.perf_counter() - t_origin
            active.remove(occ)
            occurrences.append(occ)

    @contextmanager
    def phase(self, name, planned=None):
        with timed(name, self), orig_phase(self, name, planned) as rec:
            yield rec

    def reserve(self, tag, nbytes):
        orig_reserve(self, tag, nbytes)
        state["ledger"] = self
        for occ in active:
            if occ["ledger_peak"] is not None:
                occ["ledger_peak"] = max(occ["ledger_peak"], self.current)

    def get(self, key):
        t = orig_get(self, key)
        n = t.numel() * t.element_size()
        reads["count"] += 1
        reads["total_bytes"] += n
        if n > reads["max_bytes"]:
            reads["max_bytes"], reads["max_key"] = n, key
        return t

    def resident(self, names, tag, weights=None):
        if tag.startswith("block "):
            state["block"] = int(tag.split()[1])
        return orig_resident(self, names, tag, weights)

    def prepare_run(*a, **k):
        prep = orig_prepare(*a, **k)
        state["prep"] = prep
        return prep

    def save_block(self, *a, **k):
        with timed("save block (state file + SHA-256)"):
            return orig_save(self, *a, **k)

    def windows(*a, **k):
        with timed("tokenize calibration text"):
            return orig_windows(*a, **k)

    def update(self, i, stats):
        orig_update(self, i, stats)
        if i + 1 >= blocks:
            raise _StopBench

    Ledger.phase, Ledger.reserve, CheckpointReader.get, Scheduler.resident = phase, reserve, get, resident
    pipeline.prepare_run, RunState.update_block_stats, RunState.save_block = prepare_run, update, save_block
    pipeline.calibration_windows = windows

    rss_before = proc.memory_info().rss
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    qc, ro = parse(["--output", str(out), *flags])
    t0 = time.perf_counter()
    stopped = False
    try:
        with timed("whole run"):
            pipeline.quantize_model(qc, ro)
    except _StopBench:
        stopped = True
    seconds = time.perf_counter() - t0
    state["stop"] = True
    th.join()

    prep, ledger = state["prep"], state["ledger"]
    plan = prep.plan
    planned = {p.name: p.total for p in plan.phases}
    flops = plan.gflop_per_block
    rows = {}
    for occ in occurrences:
        key = (occ["block"], occ["phase"])
        r = rows.setdefault(key, {"block": occ["block"], "phase": occ["phase"], "seconds": 0.0, "ledger_peak": None,
                                  "rss_peak": 0, "rss_anon_peak": 0})
        r["seconds"] += occ["t1"] - occ["t0"]
        if occ["ledger_peak"] is not None:
            r["ledger_peak"] = max(r["ledger_peak"] or 0, occ["ledger_peak"])
        inside = [s for s in samples if occ["t0"] <= s[0] <= occ["t1"]]
        if inside:
            r["rss_peak"] = max(r["rss_peak"], max(s[1] for s in inside))
            r["rss_anon_peak"] = max(r["rss_anon_peak"], max(s[2] for s in inside))
    for r in rows.values():
        r["planned_device"] = planned.get(r["phase"])
        g = flops.get(r["phase"])
        r["gflop"] = g
        r["gflop_per_s"] = g / r["seconds"] if g and r["seconds"] > 0 else None
    row = {
        "label": label, "flags": flags, "blocks_done": blocks, "stopped_early": stopped,
        "seconds": seconds, "rss_before_run": rss_before,
        "rss_peak": max(s[1] for s in samples), "rss_anon_peak": max(s[2] for s in samples),
        "disk_peak": max(d[1] for d in disk) if disk else 0,
        "largest_read": reads, "plan": plan.as_dict(), "plan_host_total": plan.cpu_total,
        "ledger_peak": ledger.peak if ledger else None, "budget": plan.budget, "cpu_budget": plan.cpu_budget,
        "ledger_phases": ledger.report()["phases"] if ledger else None,   # + torch.cuda peaks on CUDA
        "phases": sorted(rows.values(), key=lambda r: (r["block"], next(
            (o["t0"] for o in occurrences if o["phase"] == r["phase"] and o["block"] == r["block"]), 0))),
        "rss_trace": [(round(t, 2), rss) for t, rss, _ in samples[::10]],
        "disk_trace": [(round(t, 1), b) for t, b in disk[::4]],
        "torch_threads": torch.get_num_threads(),
    }
    result.write_text(json.dumps(row, default=str))


# ----------------------------------------------------------------------------------------------
# orchestration (parent)
# ----------------------------------------------------------------------------------------------
def ensure_checkpoint(blocks: int) -> Path:
    if (CKPT / "model.safetensors.index.json").is_file():
        return CKPT
    from synth_checkpoint import write_synthetic
    print(f"writing the synthetic checkpoint {CKPT} ({blocks} blocks)", flush=True)
    write_synthetic(REPO / "configs" / "llama-2-7b.json", CKPT, blocks=blocks, shard_size=2 * 10 ** 9,
                    tokenizer=REPO.parent / "shared" / "models" / "llama-wt2-9m")
    return CKPT


def _child_cmd(label, flags, out, blocks, result):
    return [sys.executable, str(Path(__file__).resolve()), "--child", label, "--out", str(out), "--blocks", str(blocks),
            "--result", str(result), "--", *flags]


def run_one(label: str, flags: list[str], blocks: int) -> dict:
    out = WORK / f"scale-{label}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    result = WORK / f"scale-{label}.json"
    full = ["--model", str(CKPT), *COMMON, *flags]
    print(f"[{label}] python run_quant.py {' '.join(full)} --output {out}  (stops after {blocks} blocks)", flush=True)
    subprocess.run(_child_cmd(label, full, out, blocks, result), check=True, cwd=REPO)
    row = json.loads(result.read_text())
    row["command"] = "python run_quant.py " + " ".join(full) + f" --output {out}"
    print(f"[{label}] {row['seconds']:.0f} s, RSS peak {row['rss_peak'] / 2 ** 30:.2f} GiB, disk peak "
          f"{row['disk_peak'] / 2 ** 30:.2f} GiB", flush=True)
    return row


def kill_test(blocks: int) -> dict:
    """kill -9 halfway through block 2's statistics, rerun the same command, finish; time lost."""
    label, flags = "boa-noblockv-kill", RUNS["boa-noblockv"]   # resume is method-independent; half the time
    out = WORK / f"scale-{label}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    full = ["--model", str(CKPT), *COMMON, *flags]
    manifest = out / "quant_state" / "manifest.json"
    res1 = WORK / "scale-kill-1.json"
    t0 = time.perf_counter()
    p = subprocess.Popen(_child_cmd(label, full, out, blocks, res1), cwd=REPO)
    t_block0 = None
    while p.poll() is None:
        try:
            m = json.loads(manifest.read_text())
            if "0" in m.get("blocks", {}) and "phase_seconds" in m["blocks"]["0"] and \
                    "propagate (block forward)" in m["blocks"]["0"]["phase_seconds"]:
                t_block0 = t_block0 or time.perf_counter() - t0
        except (OSError, ValueError):
            pass
        if t_block0 is not None and time.perf_counter() - t0 > t_block0 + 60:
            break
        time.sleep(0.5)
    t_kill = time.perf_counter() - t0
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    print(f"[kill] killed with -9 at {t_kill:.0f} s ({t_kill - t_block0:.0f} s into block 2)", flush=True)
    res2 = WORK / "scale-kill-2.json"
    subprocess.run(_child_cmd(label, full, out, blocks, res2), check=True, cwd=REPO)
    second = json.loads(res2.read_text())
    return {"label": label, "command": "python run_quant.py " + " ".join(full) + f" --output {out}",
            "first_run_seconds_until_kill": t_kill, "block1_done_at": t_block0,
            "lost_in_killed_block": t_kill - t_block0, "resume_run": second}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=("main", "kill", "grid"), help="main: boa/gptq/boa-noblockv; kill: kill -9 "
                    "and resume; grid: one block of BoA with the default Hessian grid")
    ap.add_argument("--runs", default=None, help="labels to run (default: the study's)")
    ap.add_argument("--blocks", type=int, default=2, help="blocks quantized per run (default 2)")
    ap.add_argument("--ckpt-blocks", type=int, default=32, help="blocks in the synthetic checkpoint (default 32)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("flags", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.flags, args.out, args.blocks, args.result)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.study:
        WORK.mkdir(parents=True, exist_ok=True)
        ensure_checkpoint(args.ckpt_blocks)
        data["checkpoint"] = {"dir": str(CKPT), "bytes": sum(f.stat().st_size for f in CKPT.glob("*.safetensors")),
                              "shards": len(list(CKPT.glob("*.safetensors"))),
                              "note": "random fp16 weights (synth_checkpoint.py): memory and time only"}
        if args.study == "kill":
            data["kill"] = kill_test(args.blocks)
        else:
            labels = args.runs.split(",") if args.runs else (["boa-hessian-grid"] if args.study == "grid"
                                                              else ["boa", "gptq", "boa-noblockv"])
            for label in labels:
                data.setdefault("runs", {})[label] = run_one(label, RUNS[label], 1 if args.study == "grid"
                                                             else args.blocks)
        RESULTS.write_text(json.dumps(data, indent=1, default=str))
    if args.report or args.study:
        report(data)


def _g(n):
    return f"{n / 2 ** 30:.2f}" if n is not None else "–"


def report(data: dict) -> None:
    for label, run in data.get("runs", {}).items():
        print(f"\n### {label}: `{run['command']}`\n")
        print(f"{run['seconds']:.0f} s for {run['blocks_done']} block(s); RSS before the run "
              f"{_g(run['rss_before_run'])} GiB, peak {_g(run['rss_peak'])} GiB (anonymous {_g(run['rss_anon_peak'])} "
              f"GiB); plan: device {_g(run['plan']['predicted_peak_bytes'])} GiB + host {_g(run['plan_host_total'])} GiB;"
              f" ledger peak {_g(run['ledger_peak'])} GiB of {_g(run['budget'])} GiB; disk peak {_g(run['disk_peak'])} GiB;"
              f" activations on disk: {run['plan']['activations_on_disk']}; largest single read "
              f"{run['largest_read']['max_bytes'] / 2 ** 20:.0f} MiB ({run['largest_read']['max_key']}), "
              f"{run['largest_read']['count']} reads, {run['largest_read']['total_bytes'] / 2 ** 30:.2f} GiB in all\n")
        print("| block | phase | s | planned device | ledger peak | planned host | planned total | RSS peak "
              "(anonymous) | RSS / planned | GFLOP | GFLOP/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        terms = run["plan"]["cpu_terms"]
        rest = run["plan_host_total"] - terms.get("Hessians on host", 0)
        for r in run["phases"]:
            if r["phase"] == "whole run":
                continue
            pd = r["planned_device"] or 0
            if r["phase"].startswith("save block"):    # inside the block's residency: its weights are placed
                pd = r["planned_device"] = run["plan"]["phases"]["solve (per layer)"]["terms"]["block weights"]
            ph = run["plan"].get("host_by_phase", {}).get(r["phase"], rest)
            tot = pd + ph
            gf = f"{r['gflop']:,.0f} | {r['gflop_per_s']:.1f}" if r["gflop"] else "– | –"
            print(f"| {r['block'] + 1 if r['block'] >= 0 else '–'} | {r['phase']} | {r['seconds']:.1f} | "
                  f"{_g(r['planned_device'])} | {_g(r['ledger_peak'])} | {_g(ph)} | {_g(tot)} | {_g(r['rss_peak'])} "
                  f"({_g(r['rss_anon_peak'])}) | {r['rss_peak'] / tot:.2f} | {gf} |")
    k = data.get("kill")
    if k:
        r2 = k["resume_run"]
        print(f"\n### kill -9 and resume: `{k['command']}`\n\nkilled {k['lost_in_killed_block']:.0f} s into block 2 "
              f"(block 1 finished at {k['block1_done_at']:.0f} s); the rerun took {r2['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
