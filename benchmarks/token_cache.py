"""Time of the calibration and evaluation texts' token ids: tokenized (cold) against read back from
the on-disk token cache (warm; ``lowmem_boa/data/token_cache.py``).

    OMP_NUM_THREADS=1 python benchmarks/token_cache.py [--model DIR] [--texts wikitext2:train,wikitext2:test,c4:valid]

Uses a fresh cache directory under a temporary directory (the user's cache is not touched). The
tokenizer library may use more than one thread for a long text: time it alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmem_boa.data import load_source, token_ids  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path.home() / ".cache" / "lowmem_boa" / "smollm2-135m"))
    ap.add_argument("--texts", default="wikitext2:train,wikitext2:test,c4:valid")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as d:
        os.environ["LOWMEM_BOA_CACHE"] = d
        os.environ.pop("LOWMEM_BOA_TOKEN_CACHE", None)
        for spec in args.texts.split(","):
            name, split = spec.split(":")
            src = load_source(name, split, args.data_dir)
            text = src.docs[0] if not src.per_document else " ".join(src.docs)
            t0 = time.perf_counter()
            cold = token_ids(tok, text)
            t1 = time.perf_counter()
            warm = token_ids(tok, text)
            t2 = time.perf_counter()
            assert warm.equal(cold)
            print(f"{name} {split} ({len(text) / 1e6:.1f} M characters, {cold.numel():,} tokens): "
                  f"tokenized {t1 - t0:.2f} s, from the cache {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()
