#!/usr/bin/env python
"""Quantize a Hugging Face causal LM with BoA / GPTQ / RTN (streaming pipeline: not yet available)."""

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print("run_quant.py: the streaming quantization pipeline is not yet available in this version.\n"
          "The solver core is: see lowmem_boa.solvers (rtn, gptq, boa) and README.md.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
