"""Host RAM of GPTQ-protocol tokenization: the whole WikiText-2 train text tokenized in one call.

    python benchmarks/tokenize_rss.py [--model ../shared/models/llama-wt2-9m] [--dataset wikitext2]

Prints the process RSS before and the peak RSS (ru_maxrss) after building the calibration windows
(with the token cache off: the tokenization itself is measured).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmem_boa.data import calibration_windows, load_source  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "llama-wt2-9m"))
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args(argv)
    os.environ["LOWMEM_BOA_TOKEN_CACHE"] = "0"
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    src = load_source(args.dataset, "train", args.data_dir)
    before = psutil.Process().memory_info().rss
    ids = calibration_windows(tok, src, 128, 512, 0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    chars = sum(len(d) for d in src.docs)
    print(f"{args.dataset} train ({chars / 1e6:.1f} M characters): RSS before {before / 2 ** 20:.0f} MiB, "
          f"peak after calibration_windows {peak / 2 ** 20:.0f} MiB, windows {tuple(ids.shape)}")


if __name__ == "__main__":
    main()
