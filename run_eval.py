#!/usr/bin/env python
"""Evaluate a (quantized) model: perplexity and zero-shot accuracy. See `python run_eval.py --help`."""

import sys

from lowmem_boa.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
