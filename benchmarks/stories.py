"""Seed-averaged quality study on ``stories260K`` (a real, quantization-sensitive Llama with GQA).

    python benchmarks/stories.py --study main      # the benchmark table: methods x bits x seeds
    python benchmarks/stories.py --study ab        # A/B of the differences to the official BoA code
    python benchmarks/stories.py --study orders    # act-order: fixed combinations, --search-orders, oracle
    python benchmarks/stories.py --study calib     # calibration budget: 128 / 256 / 512 windows of 512
    python benchmarks/stories.py --study fpt       # --fp-targets (fit to the fp model's outputs)
    python benchmarks/stories.py --study mlprow    # BoA's MLP row Hessians (the default) vs the paper's BoA

Setup (issue 10): calibration windows of 512 tokens from ``../shared/data/tinystories/train.txt``
(``--calib-file``, tokenized once, random offsets from ``--seed``), perplexity on
``tinystories/validation.txt`` with the GPTQ protocol (whole text tokenized once, non-overlapping
512-token windows: 387), asymmetric per-channel weights, every linear layer of every block. Each
configuration runs once per calibration seed (default seeds 0-4); tables give the mean, the
standard deviation over seeds and the range. Runs go through ``run_quant.py``'s own code path
(``lowmem_boa.cli.quant.main``) in worker processes, ``--jobs`` at a time with one thread each
(quality numbers do not depend on the thread count; the time column is per run, measured while
``--jobs`` runs shared the machine). ``validation.txt`` is only ever evaluated, never used to pick
a setting inside a run; where a study *selects* by it (the paper's best-of-four act-order
protocol), the table says so.

Raw results go to ``benchmarks/results/stories.json`` (appended run by run, shared by the studies, so an
interrupted study resumes where it stopped: rows already present are not recomputed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality import LLMC_VENV, ensure_llmc_venv  # noqa: E402  (benchmarks/ is on sys.path as the script's dir)

SEQLEN = 512
MODEL = "stories260K"

# variant name -> run_quant.py flags (besides model/bits/seed/nsamples/data)
# defaults (one-pass statistics, V row Hessian on) unless the name says otherwise; "boa*" rows without
# "mlprow" are the paper's BoA (attention only: --no-mlp-row-hessian, the default before issue 10's
# second round); "boa-mlprow*" solve the MLP-input layers with their row Hessian (the default now)
VARIANTS = {
    "rtn": ["--method", "rtn", "--qparam", "minmax"],
    "gptq": ["--method", "gptq"],
    "gptq-minmax": ["--method", "gptq", "--qparam", "minmax"],
    "gptq-seq": ["--method", "gptq", "--true-sequential"],
    "gptq-seq-damp03": ["--method", "gptq", "--true-sequential", "--percdamp", "0.03"],
    "gptq-seq-damp10": ["--method", "gptq", "--true-sequential", "--percdamp", "0.1"],
    "boa": ["--method", "boa", "--no-mlp-row-hessian"],
    "boa-noblockv": ["--method", "boa", "--no-block-v", "--no-mlp-row-hessian"],
    "boa-novrow": ["--method", "boa", "--no-v-row-hessian", "--no-mlp-row-hessian"],   # the official code's configuration
    "boa-seq": ["--method", "boa", "--true-sequential", "--no-mlp-row-hessian"],
    "boa-seq-novrow": ["--method", "boa", "--true-sequential", "--no-v-row-hessian", "--no-mlp-row-hessian"],
    "boa-seq-damp03": ["--method", "boa", "--true-sequential", "--percdamp", "0.03", "--no-mlp-row-hessian"],
    "boa-seq-damp10": ["--method", "boa", "--true-sequential", "--percdamp", "0.1", "--no-mlp-row-hessian"],
    "boa+col": ["--method", "boa", "--act-order-col", "--no-mlp-row-hessian"],
    "boa+row": ["--method", "boa", "--act-order-row", "--no-mlp-row-hessian"],
    "boa+col+row": ["--method", "boa", "--act-order-col", "--act-order-row", "--no-mlp-row-hessian"],
    "boa-search": ["--method", "boa", "--search-orders", "--no-mlp-row-hessian"],
    "gptq+col": ["--method", "gptq", "--act-order-col"],
    "gptq-search": ["--method", "gptq", "--search-orders"],
    "gptq-fpt": ["--method", "gptq", "--fp-targets"],
    "boa-fpt": ["--method", "boa", "--fp-targets", "--no-mlp-row-hessian"],
    "boa-mlprow": ["--method", "boa", "--mlp-row-hessian"],
    "boa-mlprow-full": ["--method", "boa", "--mlp-row-hessian", "--mlp-row-group", "100000"],
    "boa-mlprow-search": ["--method", "boa", "--mlp-row-hessian", "--search-orders"],
}

STUDIES = {
    "ab": {"bits": [2], "variants": ["gptq-seq", "gptq", "boa-seq", "boa", "boa-seq-novrow", "boa-novrow",
                                     "gptq-seq-damp03", "boa-seq-damp03", "gptq-seq-damp10", "boa-seq-damp10"],
           "nsamples": [128]},
    "orders": {"bits": [2], "variants": ["boa", "boa+col", "boa+row", "boa+col+row", "boa-search", "gptq", "gptq+col",
                                         "gptq-search"], "nsamples": [128]},
    "calib": {"bits": [2], "variants": ["gptq", "boa"], "nsamples": [128, 256, 512]},
    "fpt": {"bits": [2], "variants": ["gptq", "boa", "gptq-fpt", "boa-fpt"], "nsamples": [128]},
    "mlprow": {"bits": [2, 3, 4], "variants": ["gptq", "boa", "boa-mlprow", "boa-mlprow-full", "boa-mlprow-search"],
               "nsamples": [128]},
    "main": {"bits": [2, 3, 4], "variants": ["rtn", "gptq-minmax", "llmc-gptq", "gptq", "boa", "boa-noblockv",
                                             "boa-mlprow"],
             "nsamples": [128]},
}


def _paths(shared: Path):
    return (shared / "models" / MODEL, shared / "data" / "tinystories" / "train.txt",
            shared / "data" / "tinystories" / "validation.txt")


_EVAL = {}


def _eval_windows(tok_dir: Path, valid: Path):
    if "windows" not in _EVAL:
        from transformers import AutoTokenizer
        from lowmem_boa.data import eval_windows, file_source
        _EVAL["windows"] = eval_windows(AutoTokenizer.from_pretrained(tok_dir), file_source(valid), SEQLEN)
    return _EVAL["windows"]


def run_one(job: dict) -> dict:
    """Quantize one configuration and evaluate it (runs in a worker process)."""
    import torch
    torch.set_num_threads(job["threads"])
    from lowmem_boa.eval import streaming_nll
    shared, work = Path(job["shared"]), Path(job["work"])
    model_dir, train, valid = _paths(shared)
    out = work / f"{job['variant']}-w{job['bits']}-n{job['nsamples']}-s{job['seed']}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if job["variant"] == "llmc-gptq":
        import subprocess
        from transformers import AutoTokenizer
        from lowmem_boa.data import calibration_windows, file_source
        ids = calibration_windows(AutoTokenizer.from_pretrained(model_dir), file_source(train), job["nsamples"],
                                  SEQLEN, job["seed"])
        out.mkdir(parents=True)
        torch.save(ids, out / "calib.pt")
        env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
        subprocess.run([str(LLMC_VENV / "bin" / "python"), str(REPO / "benchmarks" / "llmc_gptq.py"), "--model",
                        str(model_dir), "--calib", str(out / "calib.pt"), "--bits", str(job["bits"]), "--out",
                        str(out / "model")], check=True, capture_output=True, env=env)
        qdir = out / "model"
        report = {}
    else:
        from lowmem_boa.cli.quant import main as quant_main
        argv = ["--model", str(model_dir), "--wbits", str(job["bits"]), "--seqlen", str(SEQLEN),
                "--nsamples", str(job["nsamples"]), "--seed", str(job["seed"]), "--calib-file", str(train),
                "--device", "cpu", "--output", str(out), "--no-progress", *VARIANTS[job["variant"]]]
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            rc = quant_main(argv)
        if rc != 0:
            raise RuntimeError(f"run_quant {' '.join(argv)} exited {rc}")
        qdir = out
        report = json.loads((out / "quant_report.json").read_text())
    seconds = time.perf_counter() - t0
    windows = _eval_windows(model_dir, valid)
    ppl = streaming_nll(qdir, windows, torch.device("cpu"), 8 * 2 ** 30)["ppl"]
    row = {k: job[k] for k in ("variant", "bits", "seed", "nsamples")}
    row.update(ppl=ppl, quant_seconds=seconds)
    if report:
        blocks = report["blocks"].items()
        row["layer_info"] = {i: {lay["name"]: {k: lay[k] for k in ("rel_error", "rel_attention_error")}
                                 for lay in b["layers"]} for i, b in blocks}
        orders = {f"{i}.{lay['name']}": lay["info"].get("orders") for i, b in blocks
                  for lay in b["layers"] if lay["info"].get("orders")}
        if orders:
            row["orders"] = orders
    if job.get("attn_windows"):
        # held out from calibration: the first validation windows (evaluated, never selected on)
        from lowmem_boa.eval import attention_output_errors
        row["attn_rel_error"] = [a["rel_error"] for a in attention_output_errors(
            model_dir, qdir, windows[: job["attn_windows"]], torch.device("cpu"), 8 * 2 ** 30)]
    if not job.get("keep"):
        shutil.rmtree(out, ignore_errors=True)
    return row


def summarize(rows: list[dict], fp: float | None = None) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["variant"], r["bits"], r["nsamples"]), []).append(r)
    out = []
    for (variant, bits, ns), rs in groups.items():
        p = [r["ppl"] for r in sorted(rs, key=lambda r: r["seed"])]
        out.append({"variant": variant, "bits": bits, "nsamples": ns, "seeds": [r["seed"] for r in rs],
                    "ppl": p, "mean": statistics.fmean(p), "std": statistics.stdev(p) if len(p) > 1 else 0.0,
                    "min": min(p), "max": max(p),
                    "quant_seconds": statistics.fmean(r["quant_seconds"] for r in rs)})
    return out


def markdown(summary: list[dict], fp: float | None, ref: dict | None = None) -> str:
    lines = ["| bits | windows | variant | mean PPL | std | min–max | per seed | (X−fp)/(GPTQ−fp) | s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["bits"], s["nsamples"], s["mean"])):
        g = next((t for t in summary if t["variant"] == "gptq" and t["bits"] == s["bits"]
                  and t["nsamples"] == s["nsamples"]), None)
        ratio = f"{(s['mean'] - fp) / (g['mean'] - fp):.3f}" if (g and fp is not None) else "–"
        lines.append(f"| {s['bits']} | {s['nsamples']} | {s['variant']} | {s['mean']:.3f} | {s['std']:.3f} | "
                     f"{s['min']:.2f}–{s['max']:.2f} | {' / '.join(f'{p:.2f}' for p in s['ppl'])} | {ratio} | "
                     f"{s['quant_seconds']:.1f} |")
    return "\n".join(lines)


def attention_table(runs: list[dict]) -> str:
    """Per (bits, variant): the per-block attention-output error averaged over seeds, and BoA/GPTQ."""
    acc: dict = {}
    for r in runs:
        if r.get("attn_rel_error"):
            acc.setdefault((r["bits"], r["variant"]), []).append(r["attn_rel_error"])
    mean = {k: [statistics.fmean(col) for col in zip(*v)] for k, v in acc.items()}
    lines = ["| bits | variant | seeds | error per block (mean over seeds) | / GPTQ per block |", "|---|---|---|---|---|"]
    for (bits, variant), m in sorted(mean.items()):
        g = mean.get((bits, "gptq"))
        ratio = " / ".join(f"{a / b:.3f}" for a, b in zip(m, g)) if g and variant != "gptq" else "–"
        lines.append(f"| {bits} | {variant} | {len(acc[(bits, variant)])} | " + " / ".join(f"{e:.4f}" for e in m)
                     + f" | {ratio} |")
    return "\n".join(lines)


def paper_protocol(runs: list[dict], group: list[str], bits: int = 2, nsamples: int = 128) -> str:
    """The paper's act-order protocol: per seed, the best of ``group`` *by validation perplexity*
    (this selects on the evaluation text; reported as such, never as a method)."""
    best = {}
    for r in runs:
        if r["variant"] in group and r["bits"] == bits and r["nsamples"] == nsamples:
            if r["seed"] not in best or r["ppl"] < best[r["seed"]][0]:
                best[r["seed"]] = (r["ppl"], r["variant"])
    if not best:
        return f"paper protocol over {group}: no rows"
    vals = [best[k][0] for k in sorted(best)]
    return (f"paper protocol (best of {', '.join(group)} by validation PPL, per seed; selects on the test text): "
            f"mean {statistics.fmean(vals):.3f}, per seed " + " / ".join(f"{best[k][0]:.2f} ({best[k][1]})"
                                                                         for k in sorted(best)))


def plot(summary: list[dict], fp: float, path: Path) -> None:
    """Mean perplexity (markers) and seed range (bars) per method and bit width, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = ["rtn", "llmc-gptq", "gptq-minmax", "gptq", "boa-noblockv", "boa", "boa-mlprow"]
    for k, m in enumerate(methods):
        rows = sorted((s for s in summary if s["variant"] == m and s["nsamples"] == 128), key=lambda s: s["bits"])
        if not rows:
            continue
        label = {"boa": "boa (paper: attention only)", "boa-mlprow": "boa + MLP row Hessians (default)"}.get(m, m)
        x = [s["bits"] + (k - len(methods) / 2) * 0.06 for s in rows]
        y = [s["mean"] for s in rows]
        err = [[s["mean"] - s["min"] for s in rows], [s["max"] - s["mean"] for s in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(fp, color="gray", ls="--", lw=0.8, label=f"fp32 {fp:.3f}")
    ax.set_yscale("log")
    ax.set_xticks([2, 3, 4])
    ax.set_xlabel("weight bits")
    ax.set_ylabel("validation perplexity (mean, seed min-max)")
    ax.set_title("stories260K, 128 x 512 calibration, 5 seeds")
    ax.legend(fontsize=8)
    for m in ("gptq", "boa"):
        rows = sorted((s for s in summary if s["variant"] == m and s["bits"] == 2), key=lambda s: s["nsamples"])
        if rows:
            ax2.errorbar([s["nsamples"] for s in rows], [s["mean"] for s in rows],
                         yerr=[[s["mean"] - s["min"] for s in rows], [s["max"] - s["mean"] for s in rows]],
                         marker="o", capsize=3, label=m)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("calibration windows of 512 tokens")
    ax2.set_ylabel("2-bit validation perplexity")
    ax2.set_title("calibration budget (5 seeds)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=sorted(STUDIES))
    ap.add_argument("--report", action="store_true", help="only print the tables of every study and write the plot")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--bits", default=None, help="override the study's bit widths, e.g. 2,3")
    ap.add_argument("--variants", default=None, help="override the study's variants")
    ap.add_argument("--nsamples", default=None, help="override the study's calibration window counts")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--attn-windows", type=int, default=0,
                    help="also the per-block attention-output error on this many held-out windows")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "stories")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.report:
        data = json.loads((args.out or REPO / "benchmarks" / "results" / "stories.json").read_text())
        summary = summarize(data["runs"])
        for name, st in STUDIES.items():
            rows = [s for s in summary if s["variant"] in st["variants"] and s["bits"] in st["bits"]
                    and s["nsamples"] in st["nsamples"]]
            print(f"\n### study {name}\n\n" + markdown(rows, data["fp32"]))
        extra = REPO / "benchmarks" / "results" / "stories_attn.json"
        attn_rows = data["runs"] + (json.loads(extra.read_text())["runs"] if extra.is_file() else [])
        print("\n### attention-output error per block (mean over seeds, held-out windows)\n\n" + attention_table(attn_rows))
        for group in (["boa", "boa+col", "boa+row", "boa+col+row"], ["gptq", "gptq+col"]):
            print(paper_protocol(data["runs"], group))
        plot(summary, data["fp32"], REPO / "docs" / "stories_ppl.png")
        return
    if not args.study:
        ap.error("--study or --report")
    st = STUDIES[args.study]
    bits = [int(b) for b in args.bits.split(",")] if args.bits else st["bits"]
    variants = args.variants.split(",") if args.variants else st["variants"]
    nsamples = [int(n) for n in args.nsamples.split(",")] if args.nsamples else st["nsamples"]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or REPO / "benchmarks" / "results" / "stories.json"   # one file: studies share rows
    data = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    data.setdefault("commands", []).append("python benchmarks/stories.py " + " ".join(argv or sys.argv[1:]))
    done = {(r["variant"], r["bits"], r["seed"], r["nsamples"]) for r in data["runs"]}
    if "fp32" not in data:
        import torch
        from lowmem_boa.eval import streaming_nll
        model_dir, _, valid = _paths(args.shared)
        data["fp32"] = streaming_nll(model_dir, _eval_windows(model_dir, valid), torch.device("cpu"), 8 * 2 ** 30)["ppl"]
    print(f"fp32 validation PPL {data['fp32']:.4f}", flush=True)
    jobs = [{"variant": v, "bits": b, "seed": s, "nsamples": n, "shared": str(args.shared), "work": str(args.work),
             "threads": max(1, 2 // args.jobs), "attn_windows": args.attn_windows}
            for b in bits for n in nsamples for v in variants for s in seeds if (v, b, s, n) not in done]
    if any(j["variant"] == "llmc-gptq" for j in jobs):
        ensure_llmc_venv()   # llm-compressor's own virtualenv, shared with quality.py
    args.work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # spawn, not fork: a forked child of a process that already ran torch's thread pool can hang
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        for row in ex.map(run_one, jobs):
            data["runs"].append(row)
            out.write_text(json.dumps(data, indent=1))
            print(f"{row['variant']:>14} W{row['bits']} n{row['nsamples']} seed {row['seed']}: PPL {row['ppl']:.3f} "
                  f"({row['quant_seconds']:.1f} s)" + (" attn " + " ".join(f"{e:.4f}" for e in row["attn_rel_error"])
                                                      if "attn_rel_error" in row else ""), flush=True)
    data["summary"] = summarize(data["runs"])
    out.write_text(json.dumps(data, indent=1))
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s")
    print(markdown(data["summary"], data["fp32"]))


if __name__ == "__main__":
    main()
