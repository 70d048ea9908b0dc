"""llama.cpp on a GGUF file (runs inside ``benchmarks/_work/venv-llamacpp``: llama-cpp-python built from
source, its vendored llama.cpp). Driven by ``benchmarks/llamacpp_check.py``:

    VENV/bin/python benchmarks/llamacpp_eval.py ppl --model m.gguf --windows ids.npy --out r.json
    VENV/bin/python benchmarks/llamacpp_eval.py quantize --model f16.gguf --type q2_k --out q.gguf
    VENV/bin/python benchmarks/llamacpp_eval.py tokenize --model m.gguf --text t.txt --out ids.npy

``ppl``: perplexity of token windows (``(N, L)`` int array, the ids our evaluator scores: non-overlapping,
no BOS added, every next-token prediction of each window counted -- GPTQ's protocol, which
``llama-perplexity`` is not: it scores only the second half of each context). Each window is decoded
from an empty KV cache in one batch of ``L`` with all logits kept.

``quantize``: llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize in.gguf out.gguf
TYPE`` does, without an importance matrix: the Python binding cannot pass one), with llama.cpp's
per-tensor type choices for that file type. Prints the file's tensor types.

``tokenize``: llama.cpp's tokenization of a text file with the file's vocabulary (no BOS, special tokens
not parsed), as ``.npy`` ids.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import time
from pathlib import Path

import numpy as np


def perplexity(model: str, windows: np.ndarray, threads: int) -> dict:
    import llama_cpp
    from llama_cpp import Llama
    n, L = windows.shape
    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=L, n_batch=L, n_ubatch=L, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        lg = np.asarray(llm.scores[:L], dtype=np.float64)
        mx = lg.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(axis=1))
        idx = np.arange(L - 1)
        nll += float((lse[:-1] - lg[idx, w[1:]]).sum())
        count += L - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": n, "seqlen": L,
            "llama_cpp_python": llama_cpp.__version__, "load_seconds": load_s,
            "eval_seconds": time.perf_counter() - t0}


FTYPES = {"q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "q5_k": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          # llama-quantize's file-type names as --kquant takes them (q2_k_m: its "Q2_K")
          "q2_k_m": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
          "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}


def quantize(src: str, dst: str, qtype: str, threads: int) -> dict:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[qtype])
    params.nthread = threads
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    return {"ftype": FTYPES[qtype], "seconds": time.perf_counter() - t0, "bytes": Path(dst).stat().st_size}


def tokenize(model: str, text: str, out: str) -> dict:
    from llama_cpp import Llama
    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    ids = llm.tokenize(Path(text).read_text().encode(), add_bos=False, special=False)
    np.save(out, np.asarray(ids, dtype=np.int64))
    return {"tokens": len(ids)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("ppl", "quantize", "tokenize"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", help="ppl: .npy of (N, L) token ids")
    ap.add_argument("--text", help="tokenize: a text file")
    ap.add_argument("--type", help="quantize: q2_k, q3_k (Q3_K_M), q4_k (Q4_K_M), ...")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.mode == "ppl":
        res = perplexity(args.model, np.load(args.windows), args.threads)
        Path(args.out).write_text(json.dumps(res, indent=1))
    elif args.mode == "tokenize":
        res = tokenize(args.model, args.text, args.out)
    else:
        res = quantize(args.model, args.out, args.type, args.threads)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
