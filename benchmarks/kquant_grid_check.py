"""Our k-quant grid search (``solvers.kquant.superblock_grid``) against llama.cpp's own quantizer with
an importance matrix, on SmolLM2-135M's weights: importance-weighted rounding error only (no error
compensation: what each grid search alone does).

    python benchmarks/kquant_grid_check.py      # after benchmarks/llamacpp_check.py made the imatrix

For blocks 2, 5, 15, 25: q_proj, v_proj, up_proj (576 inputs: Q4_0, llama.cpp's fallback) and
down_proj (1536 inputs: Q2_K, Q3_K, Q4_K). Importance = llama-imatrix's statistic (mean square of each
input column on the full-precision model, 32 x 512 WikiText-2 calibration windows, seed 0), used by both.
Prints llama.cpp's error / ours per layer and the mean per type (> 1: ours lower).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from lowmem_boa.solvers.kquant import dequantize, ktype, quantize, superblock_grid  # noqa: E402
from llamacpp_check import SHARED, WORK, fp_weights, ggml_quantize, libggml  # noqa: E402
from quality import PROFILES, model_dir  # noqa: E402


def main():
    import gguf
    lib = libggml()
    sd = fp_weights(model_dir(PROFILES["smollm2-135m-ref"], SHARED))
    im = dict(np.load(WORK / "imatrix-32x512-s0.npz"))
    ratios = {}
    for layer in (2, 5, 15, 25):
        for proj, gname, types in [("self_attn.q_proj", "attn_q", ["q4_0"]), ("self_attn.v_proj", "attn_v", ["q4_0"]),
                                   ("mlp.down_proj", "ffn_down", ["q2_k", "q3_k", "q4_k"]),
                                   ("mlp.up_proj", "ffn_up", ["q4_0"])]:
            W = sd[f"model.layers.{layer}.{proj}.weight"].float()
            key = f"blk.{layer}.{gname}.weight"
            imp = torch.from_numpy(im[key]).float()
            R, C = W.shape
            for kq in types:
                kt = ktype(kq)
                x = W.reshape(R, C // kt.block, kt.block)
                t0 = time.perf_counter()
                grid = superblock_grid(x, kt, imp.reshape(C // kt.block, kt.block))
                dt = time.perf_counter() - t0
                ours = dequantize(quantize(x, grid.scale, grid.zero, kt), grid.scale, grid.zero, kt).reshape(R, C)
                qt = getattr(gguf.GGMLQuantizationType, kq.upper())
                theirs = torch.from_numpy(gguf.quants.dequantize(ggml_quantize(lib, W, qt, im[key]), qt).copy())
                e_ours = float(((W - ours) ** 2 * imp).sum())
                e_llama = float(((W - theirs.reshape(R, C)) ** 2 * imp).sum())
                ratios.setdefault(kq, []).append(e_llama / e_ours)
                print(f"block {layer:2d} {proj:17s} {kq}: llama.cpp+imatrix / ours {e_llama / e_ours:.3f} "
                      f"(our search {dt:.2f} s)")
    for kq, v in ratios.items():
        print(f"{kq}: mean llama.cpp+imatrix / ours {np.mean(v):.3f} over {len(v)} layers")


if __name__ == "__main__":
    main()
