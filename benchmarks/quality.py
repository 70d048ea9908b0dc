"""Quality benchmark: RTN, GPTQ, BoA (and an external GPTQ) on the real checkpoints in ../shared/models.

    python benchmarks/quality.py                       # everything below, writes docs/results_tables.md + plot
    python benchmarks/quality.py --sweep-bits 2 --max-windows 128   # the run reported in docs/results.md
    python benchmarks/quality.py --models llama-wt2-9m --bits 2 --methods gptq,boa --no-docs   # quick

For every model x bit width (128 calibration windows of 512 tokens from WikiText-2 train, seed 0):

(``--sweep-bits B``: the act-order variants run only at the bit widths B, elsewhere only the first
variant of each method.)

* rtn            MinMax grid, no data
* gptq           Hessian grid; with and without act-order, the better by WikiText-2 PPL is reported
* gptq-minmax    our GPTQ with a MinMax grid, no act-order: like-for-like with llm-compressor
* llmc-gptq      llm-compressor's GPTQModifier (MinMax observer, no act-order) in its own virtualenv
                 (benchmarks/_work/venv-llmc; it pins transformers <= 5.17), same calibration windows
* boa            Hessian grid, block_v; all four act_order_col/act_order_row combinations, the best by
                 WikiText-2 PPL is reported (as the paper and the official README do)
* boa-noblockv   BoA with a shared X X^T for V (no act-order)

Each quantization runs in its own process (run_quant.py / the llm-compressor helper): wall time and
peak RSS of that process are measured (plus our ledger's device peak). Evaluation (same code for all):
WikiText-2 / PTB test and C4 validation perplexity (GPTQ protocol: non-overlapping 512-token windows;
C4: first 256 windows of the first 1,025 documents; ``--max-windows N``: the first N windows of each),
and the per-block attention-output error ||MHA_q(X) - MHA_fp(X)||^2 / ||MHA_fp(X)||^2 on 64
WikiText-2 *validation* windows with X the original model's block inputs. PTB and C4 are evaluated
for the reported (selected) variants.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmem_boa.data import calibration_windows, eval_windows, load_source  # noqa: E402
from lowmem_boa.eval import attention_output_errors, streaming_nll  # noqa: E402

SEQLEN, SEED = 512, 0
VARIANTS = {   # method -> list of (variant name, run_quant.py flags)
    "rtn": [("rtn", ["--method", "rtn", "--qparam", "minmax"])],
    "gptq": [("gptq", ["--method", "gptq"]), ("gptq+ao", ["--method", "gptq", "--act-order-col"])],
    "gptq-minmax": [("gptq-minmax", ["--method", "gptq", "--qparam", "minmax"])],
    "llmc-gptq": [("llmc-gptq", None)],
    "boa": [("boa", ["--method", "boa"]), ("boa+col", ["--method", "boa", "--act-order-col"]),
            ("boa+row", ["--method", "boa", "--act-order-row"]),
            ("boa+col+row", ["--method", "boa", "--act-order-col", "--act-order-row"])],
    "boa-noblockv": [("boa-noblockv", ["--method", "boa", "--no-block-v"])],
}
LLMC_VENV = REPO / "benchmarks" / "_work" / "venv-llmc"


def run_measured(cmd: list[str], cwd: Path = REPO) -> dict:
    """Run ``cmd``; wall time and the peak RSS of the process (polled every 50 ms)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-4000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak, "stdout": out}


def ensure_llmc_venv() -> Path:
    py = LLMC_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "llmcompressor==0.14.0.1"], check=True)
    return py


def quantize(model_dir: Path, variant: str, flags, bits: int, out: Path, calib_file: Path, data_dir: str,
             nsamples: int) -> dict:
    if flags is None:    # llm-compressor
        py = ensure_llmc_venv()
        m = run_measured([str(py), str(REPO / "benchmarks" / "llmc_gptq.py"), "--model", str(model_dir),
                          "--calib", str(calib_file), "--bits", str(bits), "--out", str(out)])
        info = json.loads((out / "llmc_info.json").read_text())
        return {**m, "ledger_peak_bytes": None, "tool": f"llmcompressor {info['llmcompressor']}"}
    shutil.rmtree(out, ignore_errors=True)   # a fresh run: the same configuration would resume a finished one
    m = run_measured([sys.executable, str(REPO / "run_quant.py"), "--model", str(model_dir), "--wbits", str(bits),
                      "--nsamples", str(nsamples), "--seqlen", str(SEQLEN), "--seed", str(SEED), "--data-dir", data_dir,
                      "--device", "cpu", "--output", str(out), "--overwrite", "--no-progress", *flags])
    report = json.loads((out / "quant_report.json").read_text())
    return {**m, "ledger_peak_bytes": report["memory"]["ledger_peak_bytes"], "tool": "lowmem_boa"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--models", default="opt-wt2-10m,llama-wt2-9m")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--sweep-bits", default=None,
                    help="bit widths at which the act-order variants are swept (default: all of --bits); "
                         "elsewhere only the first variant of each method (no act-order) runs")
    ap.add_argument("--attn-windows", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows (128 for the reported run)")
    ap.add_argument("--max-windows", type=int, default=None,
                    help="evaluate perplexity on the first N windows of each set (default: all)")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality.json")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/results.md and the plot")
    args = ap.parse_args(argv)
    sweep_bits = set(map(int, (args.sweep_bits or args.bits).split(",")))
    from transformers import AutoTokenizer
    data_dir = str(args.shared / "data")
    cpu, budget = torch.device("cpu"), 16 * 2 ** 30
    results = {"command": "python benchmarks/quality.py " + " ".join(argv or sys.argv[1:]), "runs": [],
               "setup": {"nsamples": args.nsamples, "max_windows": args.max_windows, "seqlen": SEQLEN, "seed": SEED,
                         "torch": torch.__version__,
                         "sweep_bits": sorted(sweep_bits),
                         "threads": torch.get_num_threads()}}
    args.work.mkdir(parents=True, exist_ok=True)

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    for model in args.models.split(","):
        mdir = args.shared / "models" / model
        tok = AutoTokenizer.from_pretrained(mdir)
        sets = {name: eval_windows(tok, load_source(name, "test" if name != "c4" else "valid", data_dir), SEQLEN,
                                   args.max_windows) for name in ("wikitext2", "ptb", "c4")}
        held = eval_windows(tok, load_source("wikitext2", "valid", data_dir), SEQLEN, args.attn_windows)
        calib_file = args.work / f"{model}-calib.pt"
        torch.save(calib_windows := calibration_windows(tok, load_source("wikitext2", "train", data_dir),
                                                        args.nsamples, SEQLEN, SEED), calib_file)
        fp = {name: streaming_nll(mdir, w, cpu, budget)["ppl"] for name, w in sets.items()}
        results["runs"].append({"model": model, "method": "fp32", "variant": "fp32", "bits": 32, "selected": True,
                                "ppl": fp, "windows": {k: int(v.shape[0]) for k, v in sets.items()}})
        print(f"{model} fp32: " + " ".join(f"{k} {v:.3f}" for k, v in fp.items()), flush=True)
        save()
        for bits in map(int, args.bits.split(",")):
            for method in args.methods.split(","):
                group = []
                for variant, flags in VARIANTS[method][:None if bits in sweep_bits else 1]:
                    out = args.work / f"{model}-{variant}-w{bits}"
                    q = quantize(mdir, variant, flags, bits, out, calib_file, data_dir, args.nsamples)
                    ppl = {"wikitext2": streaming_nll(out, sets["wikitext2"], cpu, budget)["ppl"]}
                    att = [a["rel_error"] for a in attention_output_errors(mdir, out, held, cpu, budget)]
                    row = {"model": model, "method": method, "variant": variant, "bits": bits, "ppl": ppl,
                           "attn_rel_error": att, "quant_seconds": q["seconds"], "peak_rss_bytes": q["peak_rss_bytes"],
                           "ledger_peak_bytes": q["ledger_peak_bytes"], "tool": q["tool"], "selected": False,
                           "out": str(out)}
                    group.append(row)
                    print(f"{model} W{bits} {variant}: wikitext2 {ppl['wikitext2']:.3f} · attn "
                          + " ".join(f"{e:.4f}" for e in att) + f" · {q['seconds']:.1f} s", flush=True)
                best = min(group, key=lambda r: r["ppl"]["wikitext2"])
                best["selected"] = True
                for name in ("ptb", "c4"):
                    best["ppl"][name] = streaming_nll(Path(best["out"]), sets[name], cpu, budget)["ppl"]
                print(f"  -> {best['variant']}: ptb {best['ppl']['ptb']:.3f} c4 {best['ppl']['c4']:.3f}", flush=True)
                results["runs"].extend(group)
                save()
        del calib_windows
    save()
    print(markdown(results))
    if not args.no_docs:
        write_docs(results)


def _mb(x):
    return "–" if x is None else f"{x / 2 ** 20:.0f}"


def markdown(results: dict) -> str:
    lines = ["| model | bits | method (reported variant) | WikiText-2 | PTB | C4 | attention-output error, mean of blocks | "
             "quant. time (s) | peak RSS (MiB) | ledger peak (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if not r["selected"]:
            continue
        p = r["ppl"]
        att = r.get("attn_rel_error")
        name = r["method"] + (f" ({r['variant']})" if r["variant"] != r["method"] else "")
        lines.append(f"| {r['model']} | {r['bits']} | {name}"
                     + f" | {p['wikitext2']:.3f} | {p['ptb']:.2f} | {p['c4']:.3f} | "
                     + (f"{sum(att) / len(att):.5f}" if att else "–") + " | "
                     + (f"{r['quant_seconds']:.1f}" if "quant_seconds" in r else "–")
                     + f" | {_mb(r.get('peak_rss_bytes'))} | {_mb(r.get('ledger_peak_bytes'))} |")
    return "\n".join(lines)


def variants_table(results: dict) -> str:
    lines = ["| model | bits | variant | WikiText-2 | attention-output error per block | reported |",
             "|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if r["method"] in ("gptq", "boa", "boa-noblockv", "gptq-minmax", "llmc-gptq") and "attn_rel_error" in r:
            lines.append(f"| {r['model']} | {r['bits']} | {r['variant']} | {r['ppl']['wikitext2']:.3f} | "
                         + " / ".join(f"{e:.4f}" for e in r["attn_rel_error"]) + f" | {'yes' if r['selected'] else ''} |")
    return "\n".join(lines)


def write_docs(results: dict) -> None:
    (REPO / "docs" / "results_tables.md").write_text(
        "<!-- generated by benchmarks/quality.py: do not edit -->\n\n## Reported rows\n\n" + markdown(results)
        + "\n\n## All variants (WikiText-2 PPL and per-block attention-output error)\n\n" + variants_table(results) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    models = sorted({r["model"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        fp = next(r for r in results["runs"] if r["model"] == model and r["method"] == "fp32")["ppl"]["wikitext2"]
        for method in VARIANTS:
            rows = sorted((r for r in results["runs"] if r["model"] == model and r["method"] == method and r["selected"]),
                          key=lambda r: r["bits"])
            if rows:
                ax.plot([r["bits"] for r in rows], [r["ppl"]["wikitext2"] / fp for r in rows], marker="o", label=method)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{model} (fp32 WikiText-2 PPL {fp:.2f})")
        ax.set_xlabel("weight bits")
        ax.set_ylabel("WikiText-2 PPL / fp32")
        ax.set_xticks([2, 3, 4])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(REPO / "docs" / "results_ppl.png", dpi=110)


if __name__ == "__main__":
    main()
