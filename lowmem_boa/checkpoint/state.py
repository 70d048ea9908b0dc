"""Run state on disk, for resuming an interrupted job (even after ``kill -9``).

``OUTPUT/quant_state/`` (or ``--state-dir``) holds one safetensors file per finished block and
``manifest.json``. A block file is compact: each quantized linear as its integer codes bit-packed
at the run's bit width plus its grids (``name.qcodes_packed``, ``name.qscale``, ``name.qzero``), the
block's other tensors (norms, biases) as they are; the fake-quantized weights are rebuilt from the
codes when the block is loaded (the same arithmetic as the solvers: bit-identical, checked when the
block is saved; a layer whose rebuild would differ keeps its weight in the file).
Every file is written to a temporary name, flushed, fsync'ed and renamed into place, and the
manifest is rewritten the same way *after* the block file landed, so after a crash the
manifest only lists complete blocks. Each listed block carries its size and SHA-256; a file that
is missing, truncated or corrupt is detected and that block (and every later one) is redone.

The manifest is keyed by the full quantization configuration (model identity, method, bits,
grid, calibration, ...): a different configuration in the same output directory is refused
unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..config import CHANGED_DEFAULTS

FORMAT = "lowmem_boa-state/2"
BLOCK_FORMAT = "compact/1"     # codes bit-packed, fake-quantized weights rebuilt on load
STATE_DIR = "quant_state"
MANIFEST = "manifest.json"


class StateError(ValueError):
    """The output directory holds something we must not touch; raised before any work."""


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the permissions a plain ``open(path, "w")`` would (0666 minus the umask, as
    ``save_pretrained`` files get; temporary files are 0600), fsync it, rename it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
    _publish(tmp, path)


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _publish(tmp, path)


def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(bufsize)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class RunState:
    """The manifest and block files of one output directory."""

    def __init__(self, output: Path, state_dir: Path | None = None):
        self.output = Path(output)
        self.dir = Path(state_dir) if state_dir is not None else self.output / STATE_DIR
        self.path = self.dir / MANIFEST
        self.data: dict = {}

    # ----- opening ----------------------------------------------------------------------
    @staticmethod
    def check_output(output: Path, config: dict, overwrite: bool, state_dir: Path | None = None) -> str:
        """Decide what to do with ``output`` before any work: 'new', 'resume' or 'overwrite'.

        Refuses (``StateError``) a non-empty directory that is not one of our runs, and a run
        of a different configuration, unless ``overwrite``. ``overwrite`` always starts over
        (also on a run of the same configuration, which is resumed without it).
        """
        output = Path(output)
        if output.exists() and not output.is_dir():
            raise StateError(f"--output {output} exists and is not a directory")
        state = Path(state_dir) if state_dir is not None else output / STATE_DIR
        if state.exists() and not state.is_dir():
            raise StateError(f"--state-dir {state} exists and is not a directory")
        if state_dir is not None and state.is_dir() and any(state.iterdir()) and not (state / MANIFEST).is_file() \
                and not overwrite:
            raise StateError(f"--state-dir {state} is not empty and holds no lowmem_boa run state; choose an empty "
                             "or new directory")
        manifest = state / MANIFEST
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError) as e:
                if not overwrite:
                    raise StateError(f"{manifest} is unreadable ({e}); pass --overwrite to start over") from e
                return "overwrite"
            if old.get("key") == config_key(config):
                return "overwrite" if overwrite else "resume"
            if not overwrite:
                diff = sorted(k for k in set(config) | set(old.get("config", {}))
                              if config.get(k) != old.get("config", {}).get(k))
                was = old.get("config", {})
                hint = "".join(f"; the default of --{k.replace('_', '-')} changed since that run started: "
                               f"pass {flag} to resume it"
                               for k, (before, flag) in CHANGED_DEFAULTS.items()
                               if k in diff and was.get(k) == before and config.get(k) != before)
                raise StateError(f"{output} holds a run with a different configuration (differs in: "
                                 f"{', '.join(diff) or 'format'}{hint}); pass --overwrite to replace it or "
                                 "choose another --output")
            return "overwrite"
        if output.is_dir() and any(p.resolve() != state.resolve() for p in output.iterdir()):
            if not overwrite:
                raise StateError(f"--output {output} is not empty and holds no lowmem_boa run; "
                                 "choose an empty or new directory (or pass --overwrite)")
            return "overwrite"
        return "new"

    def open(self, config: dict, mode: str, execution: dict) -> None:
        if mode == "overwrite":
            self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        if mode == "resume":
            self.data = json.loads(self.path.read_text())
            self.data["resumed"] = self.data.get("resumed", 0) + 1
            self.data["execution_resumed"] = execution
        else:
            self.data = {"format": FORMAT, "key": config_key(config), "config": config,
                         "execution": execution, "blocks": {}, "complete": False, "resumed": 0}
        self._write()

    def clear(self) -> None:
        """Remove what a previous run of ours wrote: its state dir and the files it exported
        (as listed in its manifest). Nothing else in the output directory is touched."""
        exported = []
        if self.path.is_file():
            try:
                exported = json.loads(self.path.read_text()).get("exported_files", [])
            except (OSError, json.JSONDecodeError):
                pass
        for name in exported:
            path = self.output / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if self.dir.exists():
            shutil.rmtree(self.dir)

    def _write(self) -> None:
        atomic_write_bytes(self.path, json.dumps(self.data, indent=1, sort_keys=True).encode())

    # ----- blocks -----------------------------------------------------------------------
    def block_path(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.safetensors"

    def verified_prefix(self, n_blocks: int) -> int:
        """Number of leading blocks whose files are present and intact; later entries dropped."""
        k = 0
        while k < n_blocks:
            entry = self.data["blocks"].get(str(k))
            path = self.block_path(k)
            if entry is None or not path.is_file() or path.stat().st_size != entry["bytes"] \
                    or sha256_file(path) != entry["sha256"]:
                break
            k += 1
        stale = [key for key in self.data["blocks"] if int(key) >= k]
        if stale:
            for key in stale:
                del self.data["blocks"][key]
            self.data["complete"] = False
            self._write()
        return k

    def save_block(self, i: int, weights: dict[str, torch.Tensor], quant: dict, metadata: dict, stats: dict) -> None:
        """Block ``i``: its state dict ``weights`` (quantized linears fake-quantized) and ``quant``
        (layer -> codes, scale, zero), stored compactly (see the module docstring)."""
        path = self.block_path(i)
        tensors, rebuilt = compact_block(weights, quant, metadata["wbits"], metadata.get("group_size"))
        kinds = {n: t[3]["type"] for n, t in quant.items() if len(t) > 3 and t[3] is not None}
        if kinds:   # llama.cpp grids: each layer's GGUF type (its code width follows from it)
            metadata = {**metadata, "kquant_types": kinds}
        metadata = {**metadata, "format": BLOCK_FORMAT, "rebuilt": rebuilt,
                    "shapes": {n: list(quant[n][0].shape) for n in quant}, "dtype": _dtype_name(weights, quant)}
        atomic_save_safetensors(path, tensors, {"lowmem_boa": json.dumps(metadata)})
        self.data["blocks"][str(i)] = {"file": path.name, "bytes": path.stat().st_size,
                                       "sha256": sha256_file(path), **stats}
        self._write()

    def update_block_stats(self, i: int, stats: dict) -> None:
        self.data["blocks"][str(i)].update(stats)
        self._write()

    def load_block(self, i: int, codes: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
        """The block's state dict (fake-quantized weights rebuilt from the codes); with ``codes``
        also ``name.qcodes`` / ``name.qscale`` / ``name.qzero`` of every quantized linear."""
        from safetensors import safe_open
        with safe_open(str(self.block_path(i)), "pt") as f:
            meta = json.loads(f.metadata().get("lowmem_boa", "{}"))
            stored = {k: f.get_tensor(k) for k in f.keys()}
        return expand_block(stored, meta, codes), meta

    def block_stats(self) -> dict:
        return self.data["blocks"]

    def mark_complete(self, extra: dict) -> None:
        self.data["complete"] = True
        self.data.update(extra)
        self._write()


# ----- compact block files -------------------------------------------------------------------
def _dtype_name(weights: dict, quant: dict) -> str:
    name = next(iter(quant))
    return str(weights[f"{name}.weight"].dtype).replace("torch.", "")


def compact_block(weights: dict, quant: dict, bits: int, group_size: int | None) -> tuple[dict, list]:
    """Tensors of a compact block file, and the layers whose weights are rebuilt from codes."""
    from ..export.packing import pack_bits
    from ..solvers.grid import dequantize
    tensors, rebuilt = {}, []
    for name, (codes, scale, zero, *kq) in quant.items():
        w = weights[f"{name}.weight"]
        kq = kq[0] if kq else None
        tensors[f"{name}.qcodes_packed"] = pack_bits(codes, bits if kq is None else _ktype_bits(kq["type"]))
        tensors[f"{name}.qscale"] = scale
        tensors[f"{name}.qzero"] = zero
        if kq is not None:   # llama.cpp k-quant grid: its stored fields, and its own dequantization
            tensors.update({f"{name}.kq_{k}": v for k, v in kq.items() if k != "type" and v is not None})
            same = torch.equal(_kquant_weight(codes, scale, zero, kq["type"], w.dtype), w)
        else:
            same = torch.equal(dequantize(codes, scale, zero, group_size, dtype=w.dtype), w)
        if same:
            rebuilt.append(name)
    keep = {f"{n}.weight" for n in rebuilt}
    tensors.update({k: v for k, v in weights.items() if k not in keep})
    return tensors, rebuilt


def _ktype_bits(kind: str) -> int:
    from ..solvers.kquant import ktype
    return ktype(kind).bits


def _kquant_weight(codes, scale, zero, kind: str, dtype) -> torch.Tensor:
    from ..solvers.kquant import dequantize as kdequant, ktype
    kt = ktype(kind)
    s, z = scale.repeat_interleave(kt.sub, dim=-1), zero.repeat_interleave(kt.sub, dim=-1)
    return kdequant(codes.float(), s, z, kt).to(dtype)


def expand_block(stored: dict, meta: dict, codes: bool = False) -> dict:
    """The block's state dict from a block file (compact, or the older layout with weights and codes)."""
    from ..export.packing import unpack_bits
    from ..solvers.grid import dequantize
    if meta.get("format") != BLOCK_FORMAT:
        return stored if codes else {k: v for k, v in stored.items() if not k.endswith((".qcodes", ".qscale", ".qzero"))}
    kq = {".kq_sc", ".kq_m", ".kq_d", ".kq_dmin"}
    out = {k: v for k, v in stored.items()
           if not k.endswith((".qcodes_packed", ".qscale", ".qzero", *kq))}
    dtype = getattr(torch, meta["dtype"])
    kinds = meta.get("kquant_types", {})
    for name, (rows, cols) in meta["shapes"].items():
        kind = kinds.get(name)
        bits = meta["wbits"] if kind is None else _ktype_bits(kind)
        q = unpack_bits(stored[f"{name}.qcodes_packed"], bits, cols)
        if name in meta["rebuilt"]:
            s, z = stored[f"{name}.qscale"], stored[f"{name}.qzero"]
            out[f"{name}.weight"] = _kquant_weight(q, s, z, kind, dtype) if kind else \
                dequantize(q, s, z, meta.get("group_size"), dtype=dtype)
        if codes:
            out[f"{name}.qcodes"] = q
            out[f"{name}.qscale"] = stored[f"{name}.qscale"]
            out[f"{name}.qzero"] = stored[f"{name}.qzero"]
            out.update({f"{name}{k}": stored[f"{name}{k}"] for k in kq if f"{name}{k}" in stored})
    return out
