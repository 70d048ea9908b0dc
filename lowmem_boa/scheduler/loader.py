"""Model sources: a local directory or a hub id, read lazily one tensor at a time.

``CheckpointReader`` opens the safetensors files of a checkpoint (single file or sharded with
an index) and returns single tensors on demand, so a model larger than host RAM can be
streamed. ``build_skeleton`` creates the model on the meta device with accelerate (no memory),
whose modules are then filled one block at a time by the scheduler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..export.packed import MODEL_TYPE as PACKED_TYPE
from ..export.packed import original_config, read_quant_config, unpack_layer

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class ModelSourceError(ValueError):
    """The model cannot be found or read; raised before any work."""


def resolve_model_dir(model: str, need_weights: bool = True) -> Path:
    """Local directory as is; otherwise a hub id downloaded (config, tokenizer, safetensors)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelSourceError(f"model directory {model} does not exist")
    try:
        from huggingface_hub import snapshot_download
        patterns = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
        if need_weights:
            patterns.append("*.safetensors")
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated model ...
        raise ModelSourceError(f"cannot get '{model}' from the Hugging Face hub ({type(e).__name__}: {e}); "
                               "pass a local model directory instead") from e


PACKED_MODEL_TYPE = PACKED_TYPE


def _packed(model_dir: Path) -> bool:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == PACKED_MODEL_TYPE
    except (OSError, ValueError):
        return False


def open_checkpoint(model_dir: str | Path):
    """A per-tensor reader for a model directory: plain checkpoints, or lowmem_boa's packed format
    (read de-quantized)."""
    if _packed(Path(model_dir)):
        return PackedReader(model_dir)
    return CheckpointReader(model_dir)


def load_config(model: str):
    from transformers import AutoConfig
    if Path(model).is_dir() and _packed(Path(model)):
        return AutoConfig.for_model(**original_config(json.loads((Path(model) / "config.json").read_text())))
    model_dir = resolve_model_dir(model, need_weights=False) if not str(model).endswith(".json") else None
    if model_dir is None:
        path = Path(model)
        if not path.is_file():
            raise ModelSourceError(f"config file {model} does not exist")
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ModelSourceError(f"{model} has no model_type: not a Hugging Face config")
        return AutoConfig.for_model(**data)
    return AutoConfig.from_pretrained(model_dir)


class CheckpointReader:
    """Lazy per-tensor access to the safetensors weights of a model directory."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open
        self._safe_open = safe_open
        self.dir = Path(model_dir)
        index = self.dir / SAFETENSORS_INDEX
        single = self.dir / SAFETENSORS_SINGLE
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(str(single), "pt") as f:
                self.weight_map = {k: SAFETENSORS_SINGLE for k in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
            raise ModelSourceError(
                f"{self.dir} has no safetensors weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})"
                + (f"; found {', '.join(found)}: convert them to safetensors first "
                   "(e.g. load and save_pretrained(..., safe_serialization=True))" if found else ""))
        self._handles = {}

    def keys(self):
        return self.weight_map.keys()

    def resolve(self, name: str, prefix: str = "model") -> str | None:
        """Checkpoint key of a model parameter, tolerating a missing/extra base-model prefix."""
        if name in self.weight_map:
            return name
        p = prefix + "."
        alt = name[len(p):] if name.startswith(p) else p + name
        return alt if alt in self.weight_map else None

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            h = self._handles[file] = self._safe_open(str(self.dir / file), "pt")
        return h

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from disk into host memory."""
        return self._handle(self.weight_map[key]).get_tensor(key)

    def close(self) -> None:
        """Drop the open files: their memory maps keep every page read so far counted in the
        process's RSS (reclaimable page cache, but it looks like the checkpoint is held)."""
        self._handles.clear()

    def files(self) -> list[Path]:
        return sorted({self.dir / f for f in self.weight_map.values()})

    def fingerprint(self) -> dict:
        """Sizes and modification times of the weight files (cheap identity for resume)."""
        out = {}
        for f in self.files():
            st = os.stat(f)
            out[f.name] = [st.st_size, int(st.st_mtime)]
        return out


def build_skeleton(config, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """The causal LM with every parameter on the meta device (buffers such as RoPE
    frequencies are real, on the host)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    model.config.use_cache = False
    return model


class PackedReader:
    """Per-tensor access to a packed checkpoint that returns de-quantized ``.weight`` tensors
    (same interface as :class:`lowmem_boa.scheduler.CheckpointReader`), for streaming evaluation."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.inner = CheckpointReader(model_dir)
        self.q = read_quant_config(self.dir)
        self.modules = self.q["modules"]          # name -> [out_features, in_features]
        raw = original_config(json.loads((self.dir / "config.json").read_text()))
        self.dtype = getattr(torch, str(raw.get("dtype") or "float32"))

    def keys(self):
        for k in self.inner.keys():
            if k.endswith(".qweight"):
                yield k[: -len(".qweight")] + ".weight"
            elif not k.endswith((".scales", ".qzeros")):
                yield k

    def resolve(self, name: str, prefix: str = "model") -> str | None:
        if name.endswith(".weight") and name[: -len(".weight")] in self.modules:
            return name
        return self.inner.resolve(name, prefix)

    def get(self, key: str) -> torch.Tensor:
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        if base in self.modules:
            t = {k: self.inner.get(f"{base}.{k}") for k in ("qweight", "scales", "qzeros")}
            return unpack_layer(t, self.q["bits"], self.modules[base][1], self.q["group_size"], self.dtype)
        return self.inner.get(key)

    def files(self):
        return self.inner.files()

    def close(self) -> None:
        self.inner.close()

    def fingerprint(self):
        return self.inner.fingerprint()
