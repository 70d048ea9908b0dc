"""Zero-shot accuracy through lm-eval-harness (optional: ``pip install lm-eval``).

The whole model is loaded on the device (packed checkpoints stay packed: their linears de-quantize on
every forward) and wrapped in lm-eval's ``HFLM``. Standard tasks (arc_easy, arc_challenge, hellaswag,
piqa, winogrande, boolq, rte, openbookqa, ...) need the hub; ``include_path`` adds task YAMLs from a
local directory (e.g. a multiple-choice task over a local jsonl file).
"""

from __future__ import annotations

from pathlib import Path

import torch


class ZeroShotUnavailable(RuntimeError):
    pass


def load_for_inference(model_dir: str | Path, device: torch.device, dtype: torch.dtype):
    """A ready-to-run transformers model from a fake-quant/plain or a packed lowmem_boa checkpoint."""
    from transformers import AutoModelForCausalLM

    from ..export.packed import load_packed_model, read_quant_config
    if read_quant_config(Path(model_dir)) is not None:
        return load_packed_model(model_dir, device=device, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def zero_shot(model_dir: str | Path, tasks: list[str], device: torch.device, dtype: torch.dtype,
              include_path: str | None = None, limit: int | float | None = None, batch_size: int = 8,
              num_fewshot: int = 0) -> dict:
    """``{task: {metric: value}}`` for ``tasks``; raises ZeroShotUnavailable without lm-eval."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ZeroShotUnavailable("zero-shot evaluation needs lm-eval-harness: pip install lm-eval") from e
    from transformers import AutoTokenizer
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}" +
                         ("" if include_path else " (local task YAMLs need --tasks-include-path)"))
    model = load_for_inference(model_dir, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  log_samples=False, bootstrap_iters=0)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not k.startswith("alias") and "stderr" not in k}
    return results
