"""Our GPTQ exports loaded by GPTQModel (issue 18): does the engine compute what we evaluated?

    python benchmarks/gptqmodel_check.py                         # llama-wt2-9m, every variant
    python benchmarks/gptqmodel_check.py --model smollm2 --windows 8

For each variant (2/3/4 bits; per channel and groups of 128; asymmetric and symmetric) a run of
``run_quant.py`` (GPTQ, a short calibration: the format, not the solver, is under test) writes the
fake-quantized checkpoint and the ``gptq_v2`` export (and for symmetric grids ``gptq``, v1: zero − 1
stored; GPTQModel refuses asymmetric v1 checkpoints it did not write, and a zero-point of 0 has no v1
encoding). Then, in
GPTQModel's own virtualenv (``benchmarks/_work/venv-gptqmodel``: GPTQModel 7.7.0 with the torch it
needs, 2.14.1, which is not CI's), ``benchmarks/gptqmodel_eval.py`` loads each export with
GPTQModel's torch kernel in float16 and returns

* every quantized layer's weight as GPTQModel dequantizes it, compared here with our codes, zeros and
  scales (``scale`` rounded to float16 as the format stores it): **bit for bit** or not;
* the perplexity of the same WikiText-2 test windows that our evaluator scores on the fake-quantized
  checkpoint, in float16 as GPTQModel computes (its kernels take no float32) and in float32.

Results: ``benchmarks/results/gptqmodel_check.json`` (rows replaced per model and variant; a variant whose
rows are there is skipped unless ``--redo``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VENV = REPO / "benchmarks" / "_work" / "venv-gptqmodel"
WORK = REPO / "benchmarks" / "_work" / "gptqmodel"
SHARED = REPO.parent / "shared"
VARIANTS = [(b, g, s) for b in (2, 3, 4) for g in (None, 128) for s in (False, True)]


def model_dir(name: str) -> Path:
    if name == "smollm2":
        return Path(os.environ.get("LOWMEM_BOA_SMOLLM2", Path.home() / ".cache" / "lowmem_boa" / "smollm2-135m"))
    return SHARED / "models" / name


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.14.1", "setuptools", "wheel", "packaging"],
                       check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "gptqmodel==7.7.0"],
                       check=True, env={**os.environ, "BUILD_CUDA_EXT": "0", "CUDA_VISIBLE_DEVICES": ""})
    return py


def tag(bits, gs, sym) -> str:
    return f"w{bits}" + (f"g{gs}" if gs else "") + ("-sym" if sym else "-asym")


def quantize(model: Path, out: Path, bits, gs, sym, nsamples, seqlen) -> None:
    if (out / "gptq_v2" / "config.json").exists():
        return
    cmd = [sys.executable, str(REPO / "run_quant.py"), "--model", str(model), "--method", "gptq", "--wbits", str(bits),
           "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--data-dir", str(SHARED / "data"),
           "--device", "cpu", "--output", str(out), "--export", "gptq,gptq_v2" if sym else "gptq_v2", "--no-progress",
           "--overwrite"]
    cmd += (["--group-size", str(gs)] if gs else []) + (["--sym"] if sym else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def our_reference(run: Path, gs: int) -> dict:
    """Per quantized layer: ``(codes - zero) * fp16(scale)`` in float16 arithmetic, as a GPTQ kernel
    dequantizes the stored fields, in float32 (``nn.Linear`` orientation). Groups are static, in the original
    column order (``g_idx = column // gs``; the last group is short when ``gs`` does not divide the inputs)."""
    from lowmem_boa.checkpoint.state import RunState
    from lowmem_boa.models import get_adapter
    from lowmem_boa.scheduler import load_config
    adapter = get_adapter(load_config(str(run)))
    state = RunState(run)
    ref = {}
    for i in range(adapter.n_blocks):
        tensors, meta = state.load_block(i, codes=True)
        for name in meta["layers"]:
            codes = tensors[f"{name}.qcodes"].to(torch.float16)
            scale, zero = tensors[f"{name}.qscale"].to(torch.float16), tensors[f"{name}.qzero"].round().to(torch.float16)
            idx = torch.arange(codes.shape[1]) // (gs or codes.shape[1])
            ref[f"{adapter.block_name(i)}.{name}.weight"] = ((codes - zero[:, idx]) * scale[:, idx]).float()
    return ref


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-wt2-9m", help="llama-wt2-9m, opt-wt2-10m, stories260K or smollm2")
    ap.add_argument("--variants", default=None, help="e.g. w2-asym,w4g128-sym (default: all 12)")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of --seqlen")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gptqmodel_check.json")
    ap.add_argument("--report", action="store_true", help="print the --model's table from the results file")
    ap.add_argument("--redo", action="store_true", help="rerun variants that already have their rows")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.out, args.model)
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from lowmem_boa.data.calibration import eval_windows, load_source
    from lowmem_boa.eval.perplexity import streaming_nll

    py = ensure_venv()
    src = model_dir(args.model)
    want = None if args.variants is None else set(args.variants.split(","))
    work = WORK / args.model
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src)
    ids = eval_windows(tok, load_source("wikitext2", "test", SHARED / "data"), args.seqlen, args.windows)
    torch.save(ids, work / "windows.pt")
    data = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    for bits, gs, sym in VARIANTS:
        t = tag(bits, gs, sym)
        if want is not None and t not in want:
            continue
        run = work / t
        fmts = ("gptq", "gptq_v2") if sym else ("gptq_v2",)
        have = {x["format"] for x in data["rows"] if (x["model"], x["variant"]) == (args.model, t) and "gptqmodel_ppl" in x
                and x.get("windows") == args.windows and x.get("seqlen") == args.seqlen}
        if not args.redo and have >= set(fmts):
            continue    # resumable: a variant with its rows is not redone
        quantize(src, run, bits, gs, sym, args.nsamples, args.seqlen)
        ours32 = streaming_nll(run, ids, torch.device("cpu"), 4 * 2 ** 30)["ppl"]
        # GPTQModel's kernels compute in float16: our evaluator in float16 is the same-precision reference
        ours = streaming_nll(run, ids, torch.device("cpu"), 4 * 2 ** 30, dtype=torch.float16)["ppl"]
        ref = our_reference(run, gs)
        for fmt in ("gptq", "gptq_v2"):
            res, deq = work / f"{t}-{fmt}.json", work / f"{t}-{fmt}.safetensors"
            if (fmt == "gptq" and not sym) or not (run / fmt / "config.json").exists():
                continue   # asymmetric v1: not exported (GPTQModel refuses it; a zero-point of 0 has no v1 encoding)
            proc = subprocess.run([str(py), str(REPO / "benchmarks" / "gptqmodel_eval.py"), "--model", str(run / fmt),
                                   "--windows", str(work / "windows.pt"), "--out", str(res), "--weights", str(deq)],
                                  capture_output=True, text=True)
            row = {"model": args.model, "variant": t, "format": fmt, "bits": bits, "group_size": gs, "sym": sym,
                   "ours_ppl": ours, "ours_ppl_float32": ours32, "windows": args.windows, "seqlen": args.seqlen}
            if proc.returncode != 0:
                row["error"] = (proc.stderr or proc.stdout)[-2000:]
                print(f"{args.model} {t} {fmt}: GPTQModel FAILED\n{row['error'][-800:]}", flush=True)
            else:
                r = json.loads(res.read_text())
                got = load_file(str(deq))
                missing = sorted(set(ref) - set(got))
                diff = max((float((got[k] - ref[k]).abs().max()) for k in ref if k in got), default=float("nan"))
                row.update(gptqmodel_ppl=r["ppl"], kernels=r["kernels"], gptqmodel=r["gptqmodel"], torch=r["torch"],
                           layers_compared=len(ref) - len(missing), layers_missing=missing[:5],
                           max_abs_weight_diff=diff, bit_exact=not missing and diff == 0.0,
                           ppl_rel_diff=r["ppl"] / ours - 1)
                print(f"{args.model} {t} {fmt}: ours float16 {ours:.4f} (float32 {ours32:.4f}) GPTQModel {r['ppl']:.4f} "
                      f"({100 * row['ppl_rel_diff']:+.3f} %), weights bit-exact {row['bit_exact']} "
                      f"(max diff {diff:.3g}, {row['layers_compared']} layers) {r['kernels']}", flush=True)
            data["rows"] = [x for x in data["rows"] if (x["model"], x["variant"], x["format"]) != (args.model, t, fmt)]
            data["rows"].append(row)
            args.out.write_text(json.dumps(data, indent=1))


def report(path: Path, model: str) -> None:
    rows = [r for r in json.loads(path.read_text())["rows"] if r["model"] == model and "gptqmodel_ppl" in r]
    print("| variant | format | ours (float16) | GPTQModel (float16) | difference | ours (float32) | weights |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['format']} | {r['ours_ppl']:.4f} | {r['gptqmodel_ppl']:.4f} | "
              f"{100 * r['ppl_rel_diff']:+.3f} % | {r.get('ours_ppl_float32', float('nan')):.4f} | "
              f"{'bit for bit' if r['bit_exact'] else 'differ'} ({r['layers_compared']} layers) |")


if __name__ == "__main__":
    main()
