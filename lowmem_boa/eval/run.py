"""Perplexity of a model directory on named test sets (GPTQ protocol), streamed under a budget."""

from __future__ import annotations

from pathlib import Path

from ..data import eval_windows, load_source
from ..scheduler import parse_size


def evaluate_perplexity(model_dir: str | Path, datasets: list[str], seqlen: int, data_dir: str | None = None,
                        device: str = "auto", max_gpu_mem: str | None = None, max_windows: int | None = None,
                        dtype=None) -> dict:
    import torch
    from transformers import AutoTokenizer

    from ..pipeline import resolve_device
    from ..scheduler import load_config
    from .perplexity import streaming_nll
    dev = resolve_device(device)
    config = load_config(str(model_dir))
    dt = dtype or (torch.float32 if dev.type == "cpu" else getattr(config, "dtype", None) or torch.float16)
    dt = getattr(torch, dt) if isinstance(dt, str) else dt
    if max_gpu_mem:
        budget = parse_size(max_gpu_mem)
    elif dev.type == "cuda":
        budget = int(torch.cuda.get_device_properties(dev).total_memory * 0.9)
    else:
        import psutil
        budget = int(psutil.virtual_memory().available * 0.8)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for name in datasets:
        source = load_source(name, "test" if name != "c4" else "valid", data_dir)
        windows = eval_windows(tok, source, seqlen, max_windows)
        res = streaming_nll(model_dir, windows, dev, budget, dt)
        res["source"] = source.origin
        if name == "c4":
            res["documents"] = len(source.docs)
        res["label"] = {"wikitext2": "WikiText-2 test", "ptb": "PTB test",
                        "c4": f"C4 validation (first {len(source.docs)} docs)"}[name]
        out[name] = res
    return out
