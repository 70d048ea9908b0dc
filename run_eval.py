#!/usr/bin/env python
"""Evaluate a quantized checkpoint (perplexity, zero-shot): not yet available."""

import sys


def main(argv=None) -> int:
    print("run_eval.py: evaluation is not yet available in this version.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
