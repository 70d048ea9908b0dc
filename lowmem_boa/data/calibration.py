"""Text corpora for calibration and evaluation: local files (``--data-dir``) or the hub.

Local layout (as in ``../shared/data``)::

    DATA_DIR/wikitext2/{train,valid,test}.txt      whole file = one text
    DATA_DIR/ptb/{train,valid,test}.txt            whole file = one text
    DATA_DIR/c4/*{train|validation}*.jsonl         one {"text": ...} document per line

Without ``--data-dir`` the Hugging Face hub datasets are used (needs internet), joined the way
GPTQ does. ``--calib-file`` takes any plain-text file (one text) or jsonl/json with "text".
Every check here runs before any model work starts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

DATASETS = ("wikitext2", "ptb", "c4")
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """Bad or missing data: raised before any work starts."""


@dataclass(frozen=True)
class TextSource:
    """A corpus split: ``docs`` are the texts to tokenize (one for WikiText/PTB files)."""
    name: str
    split: str
    docs: list[str]
    origin: str                  # file path(s) or hub id, for reports

    @property
    def per_document(self) -> bool:
        return len(self.docs) > 1


def _c4_files(data_dir: Path, split: str) -> list[Path]:
    tag = "train" if split == "train" else "validation"
    return sorted(p for p in (data_dir / "c4").glob("*.json*") if tag in p.name)


def local_files(name: str, split: str, data_dir: str | Path) -> list[Path]:
    """The files a local dataset split would be read from; raises ``DataError`` if absent."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)} or pass a file")
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose from {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a directory")
    if name == "c4":
        files = _c4_files(data_dir, split)
        if not files:
            what = "train" if split == "train" else "validation"
            raise DataError(f"no C4 {what} file (*{what}*.jsonl) in {data_dir / 'c4'}"
                            + ("; the local C4 copy may only hold validation documents, which are "
                               "used for evaluation: calibrate on another corpus or pass --calib-file"
                               if split == "train" else ""))
        return files
    path = data_dir / name / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    return [path]


def read_text_file(path: str | Path) -> list[str]:
    """Plain text -> one document; ``.jsonl``/``.json`` -> the "text" field of each record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        with path.open(encoding="utf-8") as f:
            if path.suffix == ".json":
                records = json.load(f)
                records = records if isinstance(records, list) else [records]
            else:
                records = (json.loads(line) for line in f if line.strip())
            for i, rec in enumerate(records):
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{path}: record {i} has no string field 'text'")
                docs.append(rec["text"])
        if not docs:
            raise DataError(f"{path} holds no documents")
        return docs
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path} is empty")
    return [text]


def _hub_source(name: str, split: str) -> TextSource:
    """Hub datasets joined as GPTQ does (needs internet and the ``datasets`` package)."""
    from datasets import load_dataset
    hub_split = {"train": "train", "valid": "validation", "test": "test"}[split]
    if name == "wikitext2":
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)
        return TextSource(name, split, ["\n\n".join(rows["text"])], "hub:wikitext/wikitext-2-raw-v1")
    if name == "ptb":
        rows = load_dataset("ptb_text_only", "penn_treebank", split=hub_split)
        sep = " " if split == "train" else "\n\n"
        return TextSource(name, split, [sep.join(rows["sentence"])], "hub:ptb_text_only")
    shard = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
             else "en/c4-validation.00000-of-00008.json.gz")
    rows = load_dataset("allenai/c4", data_files={"data": shard}, split="data")
    return TextSource(name, split, list(rows["text"]), f"hub:allenai/c4/{shard}")


def load_source(name: str, split: str, data_dir: str | Path | None = None) -> TextSource:
    if data_dir is None:
        if name not in DATASETS:
            raise DataError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
        return _hub_source(name, split)
    files = local_files(name, split, data_dir)
    docs = [d for f in files for d in read_text_file(f)]
    return TextSource(name, split, docs, ", ".join(str(f) for f in files))


def file_source(path: str | Path) -> TextSource:
    return TextSource("file", "train", read_text_file(path), str(path))


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of one long text, as a 1-D LongTensor (no length limit, no warnings)."""
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e30)
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved
    return ids


def calibration_windows(tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``(nsamples, seqlen)`` random token windows, GPTQ style, reproducible from ``seed``.

    One long text: tokenized once, windows start at random offsets. Many documents (C4,
    jsonl): a random document long enough for a window, then a random offset inside it.
    """
    rng = random.Random(seed)
    if not source.per_document:
        ids = tokenize_text(tokenizer, source.docs[0])
        if ids.numel() <= seqlen:
            raise DataError(f"{source.origin}: {ids.numel()} tokens, fewer than one window of {seqlen}")
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([ids[s:s + seqlen] for s in starts])
    windows, tries = [], 0
    while len(windows) < nsamples:
        tries += 1
        if tries > 100 * nsamples + 1000:
            raise DataError(f"{source.origin}: too few documents longer than {seqlen} tokens "
                            f"({len(windows)} windows found)")
        doc = source.docs[rng.randint(0, len(source.docs) - 1)]
        ids = tokenizer(doc, return_tensors="pt").input_ids[0]
        if ids.numel() <= seqlen:
            continue
        s = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[s:s + seqlen])
    return torch.stack(windows)


C4_EVAL_WINDOWS = 256   # GPTQ's C4 protocol: the first 256 windows of the joined validation documents


def eval_windows(tokenizer, source: TextSource, seqlen: int, max_windows: int | None = None):
    """Non-overlapping ``seqlen`` windows of the whole split (GPTQ's perplexity protocol).

    One text (WikiText-2, PTB): tokenized once. Documents (C4 validation): joined with spaces as
    GPTQ does and cut to the first 256 windows. Returns ``(n_windows, seqlen)``; the tail shorter
    than a window is dropped.
    """
    text = source.docs[0] if not source.per_document else " ".join(source.docs)
    ids = tokenize_text(tokenizer, text)
    n = ids.numel() // seqlen
    if source.per_document:
        n = min(n, C4_EVAL_WINDOWS)
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"{source.origin}: fewer than {seqlen} tokens")
    return ids[: n * seqlen].reshape(n, seqlen)
