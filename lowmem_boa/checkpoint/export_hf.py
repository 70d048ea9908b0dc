"""Write the fake-quantized model as a plain Hugging Face checkpoint that ``transformers`` loads.

Streams tensor by tensor: non-block weights from the source checkpoint, block weights from the
finished block files (de-quantized values in the run's dtype), into safetensors shards of at
most ``max_shard_bytes`` with a ``model.safetensors.index.json`` when there is more than one.
Config, generation config and tokenizer files are copied from the source directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .state import atomic_save_safetensors, atomic_write_bytes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def export_fake_quant(output: Path, source_dir: Path, config, tensors_in_order, dtype: torch.dtype,
                      max_shard_bytes: int = 5 * 2 ** 30, config_only: bool = False) -> list[str]:
    """The fake-quantized model: a plain checkpoint in ``dtype``; return the file names written.
    ``config_only``: just its config, generation config and tokenizer (``--no-fake-quant``)."""
    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    return write_checkpoint(output, source_dir, cfg, tensors_in_order, max_shard_bytes, weights=not config_only)


def write_checkpoint(output: Path, source_dir: Path, config: dict, tensors_in_order,
                     max_shard_bytes: int = 5 * 2 ** 30, weights: bool = True) -> list[str]:
    """Write ``config`` and safetensors shards from ``tensors_in_order`` (``(name, tensor)``, streamed),
    copy generation config and tokenizer files from ``source_dir``; return the file names."""
    output.mkdir(parents=True, exist_ok=True)
    parts: list[str] = []
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def write_current():
        nonlocal current, size
        if current:
            name = f"model-part{len(parts) + 1:05d}.safetensors"
            atomic_save_safetensors(output / name, current, {"format": "pt"})
            weight_map.update({k: name for k in current})
            parts.append(name)
            current, size = {}, 0

    for name, t in tensors_in_order:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            write_current()
        current[name] = t.contiguous()
        size += nbytes
        total += nbytes
    write_current()

    if not weights:
        written = []
    elif len(parts) == 1:
        (output / parts[0]).replace(output / "model.safetensors")
        written = ["model.safetensors"]
    else:
        n = len(parts)
        renames = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(parts)}
        for old, new in renames.items():
            (output / old).replace(output / new)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: renames[v] for k, v in sorted(weight_map.items())}}
        atomic_write_bytes(output / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
        written = [*renames.values(), "model.safetensors.index.json"]

    atomic_write_bytes(output / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())
    written.append("config.json")
    for fname in ("generation_config.json", *TOKENIZER_FILES):
        src = source_dir / fname
        if src.is_file():
            shutil.copyfile(src, output / fname)
            written.append(fname)
    return written
