"""Run state on disk, for resuming an interrupted job (even after ``kill -9``).

``OUTPUT/quant_state/`` holds one safetensors file per finished block and ``manifest.json``.
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

FORMAT = "lowmem_boa-state/1"
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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

    def __init__(self, output: Path):
        self.output = Path(output)
        self.dir = self.output / STATE_DIR
        self.path = self.dir / MANIFEST
        self.data: dict = {}

    # ----- opening ----------------------------------------------------------------------
    @staticmethod
    def check_output(output: Path, config: dict, overwrite: bool) -> str:
        """Decide what to do with ``output`` before any work: 'new', 'resume' or 'overwrite'.

        Refuses (``StateError``) a non-empty directory that is not one of our runs, and a run
        of a different configuration, unless ``overwrite``.
        """
        output = Path(output)
        if output.exists() and not output.is_dir():
            raise StateError(f"--output {output} exists and is not a directory")
        manifest = output / STATE_DIR / MANIFEST
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError) as e:
                if not overwrite:
                    raise StateError(f"{manifest} is unreadable ({e}); pass --overwrite to start over") from e
                return "overwrite"
            if old.get("key") == config_key(config):
                return "resume"
            if not overwrite:
                diff = sorted(k for k in set(config) | set(old.get("config", {}))
                              if config.get(k) != old.get("config", {}).get(k))
                raise StateError(f"{output} holds a run with a different configuration (differs in: "
                                 f"{', '.join(diff) or 'format'}); pass --overwrite to replace it or "
                                 "choose another --output")
            return "overwrite"
        if output.is_dir() and any(output.iterdir()):
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

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], metadata: dict, stats: dict) -> None:
        path = self.block_path(i)
        atomic_save_safetensors(path, tensors, {"lowmem_boa": json.dumps(metadata)})
        self.data["blocks"][str(i)] = {"file": path.name, "bytes": path.stat().st_size,
                                       "sha256": sha256_file(path), **stats}
        self._write()

    def update_block_stats(self, i: int, stats: dict) -> None:
        self.data["blocks"][str(i)].update(stats)
        self._write()

    def load_block(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors import safe_open
        with safe_open(str(self.block_path(i)), "pt") as f:
            meta = json.loads(f.metadata().get("lowmem_boa", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta

    def block_stats(self) -> dict:
        return self.data["blocks"]

    def mark_complete(self, extra: dict) -> None:
        self.data["complete"] = True
        self.data.update(extra)
        self._write()
