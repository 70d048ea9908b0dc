#!/usr/bin/env python
"""Quantize a Hugging Face causal LM with BoA / GPTQ / RTN: see `python run_quant.py --help`."""

import sys

from lowmem_boa.cli.quant import main

if __name__ == "__main__":
    sys.exit(main())
