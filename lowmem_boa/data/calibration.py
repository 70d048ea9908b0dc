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
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import token_cache

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
        try:
            return _hub_source(name, split)
        except Exception as e:   # offline (ConnectionError and friends), hub errors, missing package
            raise DataError(
                f"cannot get the {name} {split} split from the Hugging Face hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else 'no message'}). Without network, pass "
                f"--data-dir DIR (a directory with wikitext2/{{train,valid,test}}.txt, ptb/..., c4/*.jsonl) or "
                "--calib-file FILE (plain text, or jsonl/json with a 'text' field)") from e
    files = local_files(name, split, data_dir)
    docs = [d for f in files for d in read_text_file(f)]
    return TextSource(name, split, docs, ", ".join(str(f) for f in files))


def file_source(path: str | Path) -> TextSource:
    return TextSource("file", "train", read_text_file(path), str(path))


PIECE_CHARS = 1 << 20      # characters per tokenizer call for long texts
_CHECK_CHARS = 512         # characters either side of a piece border that are re-tokenized as one text


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e30)
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved


def _borders(text: str, piece_chars: int) -> list[int]:
    """Split offsets near multiples of ``piece_chars``, each between a non-space character and a
    blank (else any whitespace): for byte-level BPE (GPT-2's pre-tokenizer regex) every such offset
    is a pre-token border and BPE never merges across pre-tokens; for SentencePiece conversions
    (a word marker replaces the blank and is prepended to each text) the piece after the border
    starts with the same marker the whole text has there."""
    borders, pos = [], piece_chars
    nl, ws = re.compile(r"\S(?= )"), re.compile(r"\S(?=\s)")
    while pos < len(text) - piece_chars // 2:
        m = nl.search(text, pos, pos + piece_chars // 2) or ws.search(text, pos, pos + piece_chars // 2)
        if m is None:
            pos += piece_chars // 2
            continue
        borders.append(m.end())
        pos = m.end() + piece_chars
    return borders


def tokenize_text(tokenizer, text: str, note=None, piece_chars: int = PIECE_CHARS) -> torch.Tensor:
    """Token ids of one long text, as a 1-D LongTensor (no length limit, no warnings).

    A long text is tokenized in pieces of ~``piece_chars`` characters (a fast tokenizer's transient
    memory for one call grows with the text: ~1.5 GiB for WikiText-2 train in one call). The pieces
    are cut between a non-space and a whitespace character, and every border is checked before
    the pieces are used: the ``_CHECK_CHARS`` characters either side tokenized as one text must give
    the two sides' ids concatenated. A tokenizer that fails the check (e.g. one whose normaliser
    prepends a word marker to every text it is given, as SentencePiece conversions do) gets the
    whole text in one call, with ``note`` told why.
    """
    borders = _borders(text, piece_chars)
    if borders:
        for b in borders:
            left, right = text[max(0, b - _CHECK_CHARS):b], text[b:b + _CHECK_CHARS]
            if _encode(tokenizer, left + right, False) != _encode(tokenizer, left, False) + _encode(tokenizer, right, False):
                if note is not None:
                    note("tokenizing the text in one call (this tokenizer's ids change where the text would be "
                         "cut into pieces); that call can take ~150 bytes of RAM per character for a while")
                borders = []
                break
    if not borders:
        return torch.tensor(_encode(tokenizer, text, True), dtype=torch.long)
    cuts = [0, *borders, len(text)]
    first_plain = _encode(tokenizer, text[:cuts[1]], False)
    first_special = _encode(tokenizer, text[:cuts[1]], True)
    k = next((k for k in range(len(first_special) - len(first_plain) + 1)
              if first_special[k:k + len(first_plain)] == first_plain), None)
    if k is None:   # special tokens interleaved with the text: cannot split
        return torch.tensor(_encode(tokenizer, text, True), dtype=torch.long)
    prefix, suffix = first_special[:k], first_special[k + len(first_plain):]
    parts = [torch.tensor(prefix + first_plain, dtype=torch.long)]
    for a, b in zip(cuts[1:-1], cuts[2:]):
        parts.append(torch.tensor(_encode(tokenizer, text[a:b], False), dtype=torch.long))
    parts.append(torch.tensor(suffix, dtype=torch.long))
    return torch.cat(parts)


def token_ids(tokenizer, text: str, note=None, piece_chars: int = PIECE_CHARS) -> torch.Tensor:
    """``tokenize_text``'s ids through the on-disk token cache (``token_cache``): a text is tokenized
    once per tokenizer; later runs, resumes and evaluations read the ids back."""
    key = token_cache.cache_key(tokenizer, text, f"tokenize_text piece_chars={piece_chars} check={_CHECK_CHARS}")
    ids = token_cache.load(key) if key is not None else None
    if ids is None:
        ids = tokenize_text(tokenizer, text, note, piece_chars)
        if key is not None:
            token_cache.store(key, ids)
    return ids


def calibration_windows(tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int,
                        note=None) -> torch.Tensor:
    """``(nsamples, seqlen)`` random token windows, GPTQ style, reproducible from ``seed``.

    One long text: tokenized once (and cached: ``token_ids``), windows start at random offsets. Many documents (C4,
    jsonl): a random document long enough for a window, then a random offset inside it.
    """
    rng = random.Random(seed)
    if not source.per_document:
        ids = token_ids(tokenizer, source.docs[0], note)
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


def eval_windows(tokenizer, source: TextSource, seqlen: int, max_windows: int | None = None, note=None):
    """Non-overlapping ``seqlen`` windows of the whole split (GPTQ's perplexity protocol).

    One text (WikiText-2, PTB): tokenized once (cached: ``token_ids``). Documents (C4 validation): joined with spaces as
    GPTQ does and cut to the first 256 windows. Returns ``(n_windows, seqlen)``; the tail shorter
    than a window is dropped.
    """
    text = source.docs[0] if not source.per_document else " ".join(source.docs)
    ids = token_ids(tokenizer, text, note)
    n = ids.numel() // seqlen
    if source.per_document:
        n = min(n, C4_EVAL_WINDOWS)
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"{source.origin}: fewer than {seqlen} tokens")
    return ids[: n * seqlen].reshape(n, seqlen)
