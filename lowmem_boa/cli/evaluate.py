"""``run_eval.py``: perplexity (WikiText-2, PTB, C4; GPTQ protocol) and zero-shot accuracy.

    python run_eval.py --model out/llama2-7b-boa-w2 --datasets wikitext2,ptb,c4 --max-gpu-mem 14GiB

Reads fake-quantized or plain Hugging Face checkpoints, lowmem_boa packed checkpoints and GGUF files
(``--model file.gguf``: dequantized by transformers' GGUF loader into a temporary directory, every
k-quant type included). Perplexity streams the model one block at a time under ``--max-gpu-mem``
(a 7B evaluates on a 16 GB GPU).
Exit codes: 0 done, 2 bad input (nothing was evaluated), 1 failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data import DATASETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (fake-quant, plain, or lowmem_boa packed) "
                   "or a .gguf file")
    p.add_argument("--datasets", default="wikitext2", help=f"comma-separated from {', '.join(DATASETS)}; '' for none")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (capped to the model's positions)")
    p.add_argument("--data-dir", help="local corpora (wikitext2/, ptb/, c4/); default: Hugging Face hub")
    p.add_argument("--max-windows", type=int, help="evaluate at most this many windows per dataset (quick checks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-gpu-mem", help="device budget for streaming evaluation, e.g. 14GiB")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")
    p.add_argument("--tasks", default="", help="lm-eval tasks, e.g. arc_easy,arc_challenge,hellaswag,piqa,winogrande")
    p.add_argument("--tasks-include-path", help="directory of extra (local) lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="lm-eval: examples per task (int) or fraction")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--no-progress", action="store_true")
    return p


def is_gguf(model: str) -> bool:
    return Path(model).suffix.lower() == ".gguf"


def check_model_dir(model: str) -> dict:
    """The model must be a local directory with a config we can evaluate (or a GGUF file)."""
    path = Path(model)
    if is_gguf(model):
        if not path.is_file():
            raise ValueError(f"--model {model}: no such GGUF file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"--model {model}: not a GGUF file (no GGUF magic)")
        return {}
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json (not a Hugging Face model directory)")
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") not in (None, "lowmem_boa"):
        raise ValueError(f"--model {model} is a '{q.get('quant_method')}' checkpoint; run_eval reads fake-quantized "
                         "or plain checkpoints and lowmem_boa packed ones (evaluate the run directory instead)")
    return cfg


def main(argv=None) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..data import DataError, local_files
    from ..models import get_adapter
    from ..scheduler import ModelSourceError, PlanError, load_config
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)

    def fail(msg: str) -> int:
        console.print(f"error: {msg}", soft_wrap=True, markup=False)
        return 2

    datasets = [d for d in args.datasets.split(",") if d]
    tasks = [t for t in args.tasks.split(",") if t]
    import tempfile
    gguf_tmp = None
    try:
        check_model_dir(args.model)
        if is_gguf(args.model):   # dequantized into a temporary Hugging Face directory, removed at exit
            from ..export.gguf_file import gguf_to_hf
            gguf_tmp = tempfile.TemporaryDirectory(prefix="lowmem_boa_gguf_")
            console.print(f"note: reading {args.model} (GGUF) through transformers' GGUF loader")
            try:
                gguf_to_hf(args.model, gguf_tmp.name)
            except Exception as e:   # unsupported architecture or type: transformers says which
                raise ValueError(f"--model {args.model}: transformers cannot read this GGUF file ({e})") from e
        model_dir = gguf_tmp.name if gguf_tmp else args.model
        config = load_config(model_dir)
        adapter = get_adapter(config)
        for d in datasets:
            if d not in DATASETS:
                raise DataError(f"unknown dataset '{d}'; choose from {', '.join(DATASETS)}")
            if args.data_dir:
                local_files(d, "test" if d != "c4" else "valid", args.data_dir)
        from ..pipeline import resolve_device
        device = resolve_device(args.device)
        seqlen = args.seqlen
        if seqlen > adapter.max_positions:
            console.print(f"note: --seqlen {seqlen} capped to the model's {adapter.max_positions} positions")
            seqlen = adapter.max_positions
    except (ValueError, DataError, ModelSourceError) as e:
        return fail(str(e))

    from ..eval.run import evaluate_perplexity
    dtype = None if args.dtype == "auto" else args.dtype
    results = {"model": str(Path(args.model).resolve()), "seqlen": seqlen, "perplexity": {}, "zero_shot": {}}
    try:
        if datasets:
            results["perplexity"] = evaluate_perplexity(model_dir, datasets, seqlen, args.data_dir, args.device,
                                                        args.max_gpu_mem, args.max_windows, dtype)
        if tasks:
            from ..eval.zeroshot import ZeroShotUnavailable, zero_shot
            dt = getattr(torch, dtype) if dtype else (torch.float32 if device.type == "cpu" else torch.float16)
            limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
            try:
                results["zero_shot"] = zero_shot(model_dir, tasks, device, dt, args.tasks_include_path, limit,
                                                 args.batch_size, args.num_fewshot)
            except ZeroShotUnavailable as e:
                return fail(str(e))
    except (ValueError, DataError, PlanError) as e:
        return fail(str(e))

    table = Table(title=f"lowmem_boa evaluation: {args.model}")
    table.add_column("dataset / task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("details")
    for name, r in results["perplexity"].items():
        table.add_row(r["label"], "perplexity", f"{r['ppl']:.3f}",
                      f"{r['windows']} windows x {r['seqlen']} tokens, {r['seconds']:.0f} s")
    for task, metrics in results["zero_shot"].items():
        for k, v in metrics.items():
            table.add_row(task, k, f"{v:.4f}", "lm-eval-harness")
    console.print(table)
    if args.json:
        slim = json.loads(json.dumps(results, default=str))
        for r in slim["perplexity"].values():
            r.pop("memory", None)
        args.json.write_text(json.dumps(slim, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
