"""Host footprint side by side: peak RSS and wall time of our GPTQ / BoA vs llm-compressor's GPTQ.

    python benchmarks/footprint.py                                  # after (this checkout)
    python benchmarks/footprint.py --before /work/before            # + the same runs from an older checkout
    python benchmarks/footprint.py --study chunks                   # BoA time and RSS vs CPU chunk cap

``main``: on ``opt-wt2-10m`` (default ``--model``), 2 bits, run_quant.py with its defaults on CPU
(128 x 512 WikiText-2 calibration windows, no budget flags) for ``--method gptq`` and ``--method boa``,
and llm-compressor 0.14's GPTQ (its own virtualenv, benchmarks/llmc_gptq.py) on the very token ids
our calibration draws. Each run is a fresh process; its RSS (with children) is polled every 50 ms.
With ``--before DIR`` the two run_quant.py runs are repeated from that checkout (e.g. a git worktree
of an older commit) in the same invocation. ``chunks``: BoA with the CPU chunk cap
(``CPU_CHUNK_TOKENS``) set to each of ``--caps`` tokens (``0``: no cap, the whole budget).
Raw rows go to ``benchmarks/results/footprint.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import ensure_llmc_venv, run_measured  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "footprint.json"
WORK = REPO / "benchmarks" / "_work"
_CAPPED = ("import sys, lowmem_boa.pipeline as p; p.CPU_CHUNK_TOKENS = {cap}; "
           "from lowmem_boa.cli.quant import main; sys.exit(main(sys.argv[1:]))")


def ours(repo: Path, model: Path, method: str, data: Path, out: Path, cap: int | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = ["--model", str(model), "--method", method, "--wbits", "2", "--data-dir", str(data), "--device", "cpu",
            "--output", str(out), "--no-progress"]
    if cap is None:
        cmd = [sys.executable, str(repo / "run_quant.py"), *args]
    else:
        cmd = [sys.executable, "-c", _CAPPED.format(cap=cap if cap > 0 else "None"), *args]
    m = run_measured(cmd, cwd=repo)
    rep = json.loads((out / "quant_report.json").read_text())
    return {"seconds": m["seconds"], "peak_rss_mib": m["peak_rss_bytes"] / 2 ** 20,
            "ledger_peak_mib": rep["memory"]["ledger_peak_bytes"] / 2 ** 20, "chunk": rep["plan"]["chunk"],
            "attn_chunk": rep["plan"]["attn_chunk"], "command": "python run_quant.py " + " ".join(args)}


def llmc(model: Path, data: Path, out: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from lowmem_boa.data import calibration_windows, load_source
    ids = calibration_windows(AutoTokenizer.from_pretrained(model), load_source("wikitext2", "train", data), 128, 512, 0)
    calib = WORK / "footprint-calib.pt"
    torch.save(ids, calib)
    py = ensure_llmc_venv()
    m = run_measured([str(py), str(REPO / "benchmarks" / "llmc_gptq.py"), "--model", str(model), "--calib", str(calib),
                      "--bits", "2", "--out", str(out)])
    return {"seconds": m["seconds"], "peak_rss_mib": m["peak_rss_bytes"] / 2 ** 20, "ledger_peak_mib": None,
            "chunk": None, "attn_chunk": None, "command": f"{py} benchmarks/llmc_gptq.py --model {model} --bits 2"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=("main", "chunks"), default="main")
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared" / "models" / "opt-wt2-10m")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--before", type=Path, help="an older checkout to measure too (its run_quant.py)")
    ap.add_argument("--caps", default="0,65536,16384,8192,4096,2048")
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows = []
    if args.study == "main":
        todo = [("llm-compressor GPTQ", lambda: llmc(args.model, args.data, WORK / "fp-llmc"))]
        for method in ("gptq", "boa"):
            if args.before:
                todo.append((f"lowmem_boa {method} (before)",
                             lambda m=method: ours(args.before, args.model, m, args.data, WORK / f"fp-before-{m}")))
            todo.append((f"lowmem_boa {method}", lambda m=method: ours(REPO, args.model, m, args.data, WORK / f"fp-{m}")))
        for name, fn in todo:
            row = {"run": name, **fn()}
            rows.append(row)
            print(json.dumps(row), flush=True)
        data[f"main:{args.model.name}"] = rows
    else:
        for cap in map(int, args.caps.split(",")):
            row = {"run": f"boa, chunk cap {cap or 'none'} tokens", "cap": cap,
                   **ours(REPO, args.model, "boa", args.data, WORK / "fp-cap", cap)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        data[f"chunks:{args.model.name}"] = rows
    RESULTS.write_text(json.dumps(data, indent=1))
    print("\n| run | wall time (s) | peak RSS (MiB) | ledger peak (MiB) | chunk / block_v chunk |")
    print("|---|---|---|---|---|")
    for r in rows:
        led = f"{r['ledger_peak_mib']:.0f}" if r["ledger_peak_mib"] is not None else "–"
        ch = f"{r['chunk']} / {r['attn_chunk']}" if r["chunk"] is not None else "–"
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {led} | {ch} |")


if __name__ == "__main__":
    main()
