"""Re-solve one block's MLP-output layer (``down_proj``) in isolation, to see which part of the solve
breaks it: the grid search, the damping, or the fp-target correction.

The quantized run's checkpoint gives the quantized stream (its blocks before B; block B is put back to
full precision, as the one-pass statistics see it), the fp model the fp stream, on the run's own
calibration windows (the first ``--windows`` of them). Prints the sink tokens' share of ``H_col``,
the relative error of sink tokens and of the others for GPTQ with the full and the coarse grid, MinMax,
two dampings, and after the fp-target correction (``solvers.target.fp_target_weight``, α 0.25), with
the size of that correction, unbounded and bounded as ``--fp-max-shift 1`` does, and how far the
quantized stream is from the fp one at each step of the block (its input, the MLP's normed input, gate,
up, ``down_proj``'s input). A diagnostic (no model is written).

    OMP_NUM_THREADS=1 python benchmarks/resolve_mlp_out.py \
        --checkpoint benchmarks/_work/quality/smollm2-135m/boa-turbo-fast-w2-n128-s1 --seed 1 --block 11 --windows 8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmem_boa.data import calibration_windows, load_source  # noqa: E402
from lowmem_boa.solvers import gptq_quantize  # noqa: E402
from lowmem_boa.solvers.target import fp_target_weight  # noqa: E402


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp", default=os.path.expanduser("~/.cache/lowmem_boa/smollm2-135m"))
    ap.add_argument("--checkpoint", required=True, help="the quantized run's fake-quantized checkpoint")
    ap.add_argument("--seed", type=int, required=True, help="the run's calibration seed")
    ap.add_argument("--block", type=int, default=11)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args(argv)
    B = args.block
    tok = AutoTokenizer.from_pretrained(args.fp)
    ids = calibration_windows(tok, load_source("wikitext2", "train", data_dir=args.data_dir), args.nsamples,
                              args.seqlen, args.seed)[:args.windows]
    fp = AutoModelForCausalLM.from_pretrained(args.fp, dtype=torch.float32).eval()
    q = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    q.model.layers[B].load_state_dict(fp.model.layers[B].state_dict())
    # the two streams at each step of block B: its input (residual stream), the MLP's normed input, gate,
    # up, and down_proj's input (the statistics' X)
    rec = {}

    def keep(key, pre):
        def hook(m, a, o=None):
            rec.setdefault(key, []).append((a[0] if pre else o)[0].double())
        return hook
    for model, tag in ((q, "q"), (fp, "fp")):
        lay = model.model.layers[B]
        lay.register_forward_pre_hook(keep((tag, "block input"), True))
        lay.post_attention_layernorm.register_forward_hook(keep((tag, "MLP input (normed)"), False))
        lay.mlp.gate_proj.register_forward_hook(keep((tag, "gate_proj output"), False))
        lay.mlp.up_proj.register_forward_hook(keep((tag, "up_proj output"), False))
        lay.mlp.down_proj.register_forward_pre_hook(keep((tag, "down_proj input"), True))
    with torch.no_grad():
        for w in ids:
            q(w[None])
            fp(w[None])
    X, XF = torch.cat(rec[("q", "down_proj input")]), torch.cat(rec[("fp", "down_proj input")])
    sq = X.pow(2).sum(-1)
    top = sq > 100 * sq.median()
    print(f"{X.shape[0]} tokens, {int(top.sum())} sink tokens (> 100x the median squared norm), "
          f"their share of H_col's trace {(sq[top].sum() / sq.sum()).item():.4f}")
    for key in ("block input", "MLP input (normed)", "gate_proj output", "up_proj output", "down_proj input"):
        a, b = torch.cat(rec[("q", key)]), torch.cat(rec[("fp", key)])
        print(f"quantized vs fp stream, {key:18s}: ||a - b|| / ||b||: sink {((a - b)[top].norm() / b[top].norm()).item():.3f}, "
              f"others {((a - b)[~top].norm() / b[~top].norm()).item():.3f}")
    H = (X.T @ X / X.shape[0]).float()
    C = (XF.T @ X / X.shape[0]).float()
    W = fp.model.layers[B].mlp.down_proj.weight.data.clone()

    def err(Q, mask, ref_x):
        e = (X[mask] @ Q.double().T - ref_x[mask] @ W.double().T).pow(2).sum()
        return (e / (ref_x[mask] @ W.double().T).pow(2).sum()).item()

    for label, kw in (("full grid", {}), ("coarse 8", {"coarse": 8}), ("minmax", {"grid": "minmax"})):
        for damp in (0.01, 0.0001):
            res = gptq_quantize(W, H.clone(), 2, percdamp=damp, refine_sweeps=1, **kw)
            print(f"GPTQ {label:9s} damp {damp}: error vs W on the quantized stream: sink {err(res.Q, top, X):.4f}, "
                  f"others {err(res.Q, ~top, X):.4f}")
    print(f"||X - X_fp|| / ||X_fp||: sink {((XF - X)[top].norm() / XF[top].norm()).item():.3f}, "
          f"others {((XF - X)[~top].norm() / XF[~top].norm()).item():.3f}")
    for bound in (None, 0.25):      # unbounded, and --fp-max-shift 1 (||W' - W|| <= alpha ||W||)
        info = {}
        Wt = fp_target_weight(W.clone(), H.clone(), C.clone(), 0.01, 0.25, bound, info)
        print(f"fp-target correction (alpha 0.25, max shift {bound}): ||W' - W|| / ||W|| = "
              f"{((Wt - W).norm() / W.norm()).item():.3f}, alpha applied {info['fp_alpha_applied']:.4f}")
        for label, kw in (("full grid", {}), ("coarse 8", {"coarse": 8})):
            res = gptq_quantize(Wt, H.clone(), 2, percdamp=0.01, refine_sweeps=1, **kw)
            print(f"GPTQ on W' {label:9s}: error vs W on the quantized stream: sink {err(res.Q, top, X):.4f}, "
                  f"others {err(res.Q, ~top, X):.4f}; vs the fp output: sink {err(res.Q, top, XF):.4f}, others "
                  f"{err(res.Q, ~top, XF):.4f}")


if __name__ == "__main__":
    main()
