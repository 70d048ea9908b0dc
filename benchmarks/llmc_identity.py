"""Our GPTQ with a MinMax grid against llm-compressor's GPTQModifier, tensor by tensor.

    python benchmarks/llmc_identity.py --bits 2 --seeds 0,1

Same model (stories260K), same calibration token ids (128 x 512 from tinystories/train.txt), both
one pass per block, MinMax grid, 1 % damping, block 128, no act-order. Prints, per seed, both
validation perplexities and how many tensors of the two fake-quantized checkpoints are bitwise
equal. Needs the llm-compressor virtualenv of benchmarks/quality.py (benchmarks/_work/venv-llmc).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--shared", type=Path, default=quality.REPO.parent / "shared")
    ap.add_argument("--work", type=Path, default=quality.REPO / "benchmarks" / "_work" / "llmc_identity")
    args = ap.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    for seed in map(int, args.seeds.split(",")):
        job = dict(profile="stories260K", bits=str(args.bits), seed=seed, nsamples=128, shared=str(args.shared), work=str(args.work), threads=2,
                   keep=True)
        ppl = {v: quality.run_one({**job, "variant": v})["ppl"] for v in ("gptq-minmax", "llmc-gptq")}
        ours = load_file(quality.run_dir(args.work, {**job, "variant": "gptq-minmax"}) / "model.safetensors")
        theirs = load_file(quality.run_dir(args.work, {**job, "variant": "llmc-gptq"}) / "model" / "model.safetensors")
        equal = sum(torch.equal(ours[k], theirs[k]) for k in ours)
        frac = {k: float((ours[k] != theirs[k]).float().mean()) for k in ours if not torch.equal(ours[k], theirs[k])}
        print(f"seed {seed} W{args.bits}: ours {ppl['gptq-minmax']:.4f}, llm-compressor {ppl['llmc-gptq']:.4f}; "
              f"{equal}/{len(ours)} tensors bitwise equal" + (f"; differing fractions {frac}" if frac else ""),
              flush=True)


if __name__ == "__main__":
    main()
