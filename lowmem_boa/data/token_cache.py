"""On-disk cache of a long text's token ids (calibration and evaluation texts).

Tokenizing WikiText-2 train (~11 M characters) takes 10-25 s of a core with a fast tokenizer, and
every run, resumed run and evaluation tokenizes its texts again. The ids are stored once per
(tokenizer, text) under ``$LOWMEM_BOA_CACHE/tokens`` (default ``$XDG_CACHE_HOME/lowmem_boa`` or
``~/.cache/lowmem_boa``); ``LOWMEM_BOA_TOKEN_CACHE=0`` turns the cache off.

The key is a SHA-256 of everything the ids depend on: the text, the fast tokenizer's full
serialisation (vocabulary, merges, normaliser, pre-tokenizer, post-processor with its special
tokens, added tokens), its class, the transformers and tokenizers versions, and the caller's
tokenization settings. A tokenizer without a serialisable backend (a slow or custom one) is not
cached. A file that cannot be read is ignored and rewritten; a cache directory that cannot be
written is skipped: the cache never stops a run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "lowmem_boa-token-ids-v1"


def cache_dir() -> Path | None:
    """The token cache directory, or ``None`` when ``LOWMEM_BOA_TOKEN_CACHE=0``."""
    if os.environ.get("LOWMEM_BOA_TOKEN_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = os.environ.get("LOWMEM_BOA_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = Path(xdg) / "lowmem_boa" if xdg else Path.home() / ".cache" / "lowmem_boa"
    return Path(root) / "tokens"


def cache_key(tokenizer, text: str, settings: str) -> str | None:
    """The cache key of ``text`` under ``tokenizer`` and ``settings``; ``None`` if it cannot be cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        serial = backend.to_str() if backend is not None else None
    except Exception:        # a backend that cannot serialise itself: not cached
        serial = None
    if not isinstance(serial, str):
        return None
    import tokenizers
    import transformers
    h = hashlib.sha256()
    for part in (FORMAT, type(tokenizer).__module__ + "." + type(tokenizer).__qualname__, transformers.__version__,
                 tokenizers.__version__, settings, serial):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def load(key: str) -> torch.Tensor | None:
    d = cache_dir()
    if d is None:
        return None
    try:
        arr = np.load(d / f"{key}.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if arr.ndim != 1 or arr.dtype not in (np.int32, np.int64):
        return None
    return torch.from_numpy(arr.astype(np.int64))


def store(key: str, ids: torch.Tensor) -> None:
    """Write ``ids`` under ``key`` atomically (a concurrent reader sees the old file or the new one)."""
    d = cache_dir()
    if d is None:
        return
    dtype = np.int32 if ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < 2 ** 31) else np.int64
    tmp = None
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, ids.numpy().astype(dtype), allow_pickle=False)
        os.replace(tmp, d / f"{key}.npy")
        tmp = None
    except OSError:
        pass                   # read-only or full disk: run without the cache
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
