"""The on-disk token cache (lowmem_boa/data/token_cache.py): the cached ids are tokenize_text's, a
second call reads them back without tokenizing, the key follows the text, the tokenizer and the
settings, and a damaged file, an unwritable directory or a tokenizer without a serialisable backend
never stop a run."""

import numpy as np
import pytest
import torch

from lowmem_boa.data import calibration as calib_mod
from lowmem_boa.data.calibration import calibration_windows, eval_windows, load_source, token_ids, tokenize_text

from tiny_models import DATA, SHARED, needs_shared

pytestmark = needs_shared


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_BOA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWMEM_BOA_TOKEN_CACHE", raising=False)
    return tmp_path / "cache" / "tokens"


def _tok(name="llama-wt2-9m"):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SHARED / "models" / name)


def _counting(monkeypatch):
    calls = []
    real = calib_mod.tokenize_text

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(calib_mod, "tokenize_text", counted)
    return calls


def test_cached_ids_are_tokenize_texts_and_are_read_back(cache, monkeypatch):
    tok, text = _tok(), load_source("wikitext2", "test", DATA).docs[0]
    want = tokenize_text(tok, text)
    calls = _counting(monkeypatch)
    first = token_ids(tok, text)
    assert torch.equal(first, want) and first.dtype == torch.long and calls == [1]
    assert len(list(cache.glob("*.npy"))) == 1
    again = token_ids(_tok(), text)                 # a fresh tokenizer object: the same key
    assert torch.equal(again, want) and calls == [1]
    # another text, another tokenizer, other settings: other keys, tokenized again
    token_ids(tok, text[: len(text) // 2])
    token_ids(_tok("stories260K"), text)
    token_ids(tok, text, piece_chars=1 << 15)
    assert calls == [1, 1, 1, 1] and len(list(cache.glob("*.npy"))) == 4
    # the windows the pipeline and the evaluator use come through the cache, unchanged
    src = load_source("wikitext2", "test", DATA)
    n = len(calls)
    assert torch.equal(eval_windows(tok, src, 64, 5), want[:320].reshape(5, 64)) and len(calls) == n
    cw = calibration_windows(tok, src, 3, 32, seed=1)
    assert len(calls) == n and all(any(torch.equal(w, want[s:s + 32]) for s in range(want.numel() - 32)) for w in cw)


def test_damaged_file_is_ignored_and_rewritten(cache, monkeypatch):
    tok, text = _tok(), "a short text, tokenized once. " * 50
    want = token_ids(tok, text)
    (f,) = cache.glob("*.npy")
    f.write_bytes(b"\x93NUMPY garbage")
    calls = _counting(monkeypatch)
    assert torch.equal(token_ids(tok, text), want) and calls == [1]
    assert torch.equal(torch.from_numpy(np.load(f)).long(), want)


def test_cache_off_unwritable_or_uncacheable_still_tokenizes(tmp_path, monkeypatch):
    tok, text = _tok(), "words and more words. " * 40
    want = tokenize_text(tok, text)
    monkeypatch.setenv("LOWMEM_BOA_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("LOWMEM_BOA_TOKEN_CACHE", "0")
    assert torch.equal(token_ids(tok, text), want) and not (tmp_path / "c").exists()
    monkeypatch.delenv("LOWMEM_BOA_TOKEN_CACHE")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LOWMEM_BOA_CACHE", str(blocker))       # tokens/ cannot be made under a file
    assert torch.equal(token_ids(tok, text), want)

    class Plain:                                                 # no backend_tokenizer: never cached
        model_max_length = 10

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}
    monkeypatch.setenv("LOWMEM_BOA_CACHE", str(tmp_path / "d"))
    assert token_ids(Plain(), "abc").tolist() == [97, 98, 99] and not (tmp_path / "d").exists()
