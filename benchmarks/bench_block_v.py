"""block_v statistics: the causal row chunks of ``stats.block_v_grams`` against the whole window at once.

    OMP_NUM_THREADS=1 python benchmarks/bench_block_v.py                 # SmolLM2-135M's attention shapes
    OMP_NUM_THREADS=1 python benchmarks/bench_block_v.py --d 4096 --heads 32 --kv-heads 32 --head-dim 128 --heads-per-call 4

``row_chunk=L`` computes every score and the full ``A X`` (the masked half included), as the code did
before the row chunks; the default forms an eighth of the query positions at a time against only the
keys they see. Prints the median wall time of each and the largest relative difference of the result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem_boa.stats import block_v_grams, block_v_row_chunk  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heads-per-call", type=int, default=None, help="query heads per call (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    L, n_rep = args.seqlen, args.heads // args.kv_heads
    x = torch.randn(1, L, args.d)
    st = SimpleNamespace(q=torch.randn(1, args.heads, L, args.head_dim),
                         k=torch.randn(1, args.kv_heads, L, args.head_dim), scaling=args.head_dim ** -0.5)
    step = args.heads_per_call or args.heads

    def run(chunk):
        return torch.cat([block_v_grams(x, st, n_rep, range(h, h + step), row_chunk=chunk)
                          for h in range(0, args.heads, step)])

    times, results = {}, {}
    for name, chunk in (("whole window (row_chunk=L)", L), (f"causal row chunks of {block_v_row_chunk(L)}", None)):
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            results[name] = run(chunk)
            ts.append(time.perf_counter() - t)
        times[name] = statistics.median(ts)
    a, b = results.values()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; L={L} d={args.d} heads={args.heads} "
          f"kv={args.kv_heads} head_dim={args.head_dim}, one sample")
    for name, t in times.items():
        print(f"{name}: {t:.3f} s")
    first, second = times.values()
    print(f"speed-up {first / second:.2f}x; max |difference| / max |value| = "
          f"{((a - b).abs().max() / a.abs().max()).item():.2e}")


if __name__ == "__main__":
    main()
