"""Our GGUF k-quant exports run by llama.cpp, against llama.cpp's own quantizer (issue 18).

    python benchmarks/llamacpp_check.py --types q2_k,q3_k --methods gptq,boa       # SmolLM2, reference recipe
    python benchmarks/llamacpp_check.py --types q3_k_m,q4_k_m --methods boa,gptq  # llama.cpp's file types
    python benchmarks/llamacpp_check.py --report

Model: SmolLM2-135M (``~/.cache/lowmem_boa/smollm2-135m``). Calibration: the reference recipe of the
quality benchmark (32 x 512 WikiText-2 train windows, seed 0); evaluation: the first 64 windows of 512 of
WikiText-2 test and of C4 (``benchmarks/quality.py --profile smollm2-135m-ref``'s windows).

For each k-quant type and method, ``run_quant.py --kquant TYPE --export gguf`` (the method's defaults)
writes the fake-quantized checkpoint and ``gguf/model.gguf``; then

* **bit for bit**: every quantized tensor of the file, dequantized by the ``gguf`` package, equals the
  checkpoint's weight (q/k rows un-permuted);
* **llama.cpp = ours**: llama.cpp (``llama-cpp-python``, its vendored llama.cpp, in
  ``benchmarks/_work/venv-llamacpp``; ``benchmarks/llamacpp_eval.py``) scores the same token windows as
  our evaluator scores on the checkpoint (float32). llama.cpp's CPU matmuls round the activations to
  8 bits (Q8_0/Q8_K) for quantized weights, so equality is to that precision; the float16 file of the
  unquantized model gives the floor (same windows);
* **against llama.cpp's quantizer, same tensor types**: each quantized tensor of our file re-quantized
  from the full-precision weight by llama.cpp's own ``ggml_quantize_chunk`` (what ``llama-quantize``
  calls per tensor; loaded from the venv's ``libggml-base``), without and with an importance matrix
  (``llama-imatrix``'s statistic: the mean square of each input column of every matmul, here computed
  on the full-precision model over the same calibration windows), everything else of the file unchanged:
  equal bits per weight, equal size;
* **llama.cpp's own file type** (``llama_model_quantize``, = ``llama-quantize f16.gguf out.gguf TYPE``;
  Q3_K means Q3_K_M, Q4_K Q4_K_M: its per-tensor type mixture, its size), without and with the importance
  matrix (the second re-quantizes each tensor of the first with the matrix, as ``llama-quantize --imatrix``
  does; the first is reproduced byte for byte by ``ggml_quantize_chunk`` as a check of this path).

Results: ``benchmarks/results/llamacpp_check.json`` (rows replaced per name); resumable: a finished
quantization run or perplexity is not redone.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
VENV = REPO / "benchmarks" / "_work" / "venv-llamacpp"
WORK = REPO / "benchmarks" / "_work" / "llamacpp"
SHARED = REPO.parent / "shared"
OUT = REPO / "benchmarks" / "results" / "llamacpp_check.json"
PROFILE = "smollm2-135m-ref"


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy"], check=True)
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_CURL=OFF",
               "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
        subprocess.run([str(py), "-m", "pip", "install", "-q", "llama-cpp-python==0.3.36"], check=True, env=env)
    return py


def libggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(next(VENV.glob("lib/python3*/site-packages/llama_cpp/lib/libggml-base.so"))))
    f = lib.ggml_quantize_chunk
    f.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
    f.restype = ctypes.c_size_t
    return lib


def ggml_quantize(lib, w: torch.Tensor, qtype, imatrix: np.ndarray | None) -> np.ndarray:
    """llama.cpp's quantization of ``w`` ``(rows, cols)`` to ``qtype`` (row-wise), ``imatrix`` per column."""
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(w.float().numpy(), dtype=np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    n = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data, 0,
                                rows, cols, None if im is None else im.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    assert n == out.nbytes, (n, out.nbytes)
    return out


def fp_weights(model: Path) -> dict:
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(model.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def imatrix(model: Path, calib: torch.Tensor, path: Path) -> dict:
    """``llama-imatrix``'s statistic on the full-precision model: per matmul weight (GGUF name), the mean
    over calibration tokens of each input column's square."""
    if path.exists():
        return {k: v for k, v in np.load(path).items()}
    from transformers import AutoModelForCausalLM
    from lowmem_boa.export.gguf_file import gguf_name
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    sums, hooks = {}, []
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            def hook(_m, args, _out, key=gguf_name(name + ".weight")):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                s, c = sums.get(key, (0.0, 0))
                sums[key] = (s + (x * x).sum(0), c + x.shape[0])
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for w in calib:
            m(input_ids=w.unsqueeze(0))
    for h in hooks:
        h.remove()
    out = {k: (s / c).float().numpy() for k, (s, c) in sums.items()}
    np.savez(path, **out)
    return out


def llama_mix(own: Path, model: Path) -> dict:
    """``--kquant-type`` overrides that give our run llama.cpp's own per-layer types of ``own`` (one type
    per layer kind across blocks: the most common where its mixture varies by block), where they differ
    from what ``--kquant`` alone gives (the type or its 32-column fallback)."""
    from collections import Counter
    from lowmem_boa.export.gguf_file import _BLOCK_NAMES
    types = tensor_types(own)
    cfg = json.loads((model / "config.json").read_text())
    kinds = {}
    for name, t in types.items():
        parts = name.split(".")
        if parts[0] == "blk":
            kinds.setdefault(".".join(parts[2:]), Counter())[t.name.lower()] += 1
    base = own.name.split("-")[1].split(".")[0]      # llama-q2_k.gguf -> q2_k
    from lowmem_boa.solvers.kquant import layer_type
    cols = {"self_attn.o_proj.weight": cfg["num_attention_heads"] * (cfg.get("head_dim") or
                                                                      cfg["hidden_size"] // cfg["num_attention_heads"]),
            "mlp.down_proj.weight": cfg["intermediate_size"]}
    over = {}
    for hf, g in _BLOCK_NAMES.items():
        if g in kinds and hf.endswith("proj.weight"):
            t = kinds[g].most_common(1)[0][0]
            if t != layer_type(base, cols.get(hf, cfg["hidden_size"])):
                over[hf[: -len(".weight")]] = t
    return over


def tensor_types(path: Path) -> dict:
    import gguf
    return {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}


def requantize(lib, model: Path, sd: dict, template: Path, out: Path, imat: dict | None) -> Path:
    """``template``'s tensor types, every quantized tensor re-quantized from the full-precision weight by
    ``ggml_quantize_chunk`` (with ``imat`` where it has the tensor), the others as ``write_llama_gguf``
    writes them (float16 matrices, float32 norms)."""
    import gguf
    from lowmem_boa.export.gguf_file import RawGGUFTensor, gguf_name, write_llama_gguf
    types = tensor_types(template)
    if out.exists() and tensor_types(out) == types:
        return out
    floats = {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}
    tensors = []
    for name, w in sd.items():
        if name == "lm_head.weight":
            tensors.append((name, w))
            continue
        t = types[gguf_name(name)]
        if t in floats:
            tensors.append((name, w))
        else:
            im = None if imat is None else imat.get(gguf_name(name))
            tensors.append((name, RawGGUFTensor(ggml_quantize(lib, w, t, im), t.name)))
    return write_llama_gguf(model, out, tensors, float_type="f16")


def same_tensor_data(a: Path, b: Path) -> bool:
    """Same tensors, types and bytes (metadata aside)."""
    import gguf
    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    return set(ta) == set(tb) and all(ta[k].tensor_type == tb[k].tensor_type and
                                      np.array_equal(np.asarray(ta[k].data), np.asarray(tb[k].data)) for k in ta)


def bit_exact(run: Path) -> tuple[int, int]:
    """(quantized tensors equal to the checkpoint's weights bit for bit, quantized tensors)."""
    import gguf
    from lowmem_boa.export.gguf_file import gguf_name, unpermute_rows
    cfg = json.loads((run / "config.json").read_text())
    sd = fp_weights(run)
    r = gguf.GGUFReader(str(run / "gguf" / "model.gguf"))
    floats = {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}
    by = {t.name: t for t in r.tensors}
    same = total = 0
    for name, w in sd.items():
        if name == "lm_head.weight":
            continue
        t = by.get(gguf_name(name))
        if t is None or t.tensor_type in floats:
            continue
        q = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape).float()
        heads = (cfg["num_attention_heads"] if name.endswith("q_proj.weight") else
                 cfg["num_key_value_heads"] if name.endswith("k_proj.weight") else None)
        if heads:
            q = unpermute_rows(q, heads)
        total += 1
        same += bool(torch.equal(q, w.float()))
    return same, total


class Check:
    def __init__(self, args):
        from quality import eval_sets, model_dir, PROFILES
        self.args = args
        self.py = ensure_venv()
        self.model = model_dir(PROFILES[PROFILE], SHARED)
        self.windows = {k: v[: args.windows] for k, v in eval_sets(PROFILE, SHARED).items()}
        WORK.mkdir(parents=True, exist_ok=True)
        self.npy = {}
        for text, ids in self.windows.items():
            self.npy[text] = WORK / f"{text}-{ids.shape[0]}x{ids.shape[1]}.npy"
            np.save(self.npy[text], ids.numpy())
        self.data = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}

    def save_row(self, row: dict):   # re-read first: two checks (e.g. --mix and not) may share the file
        self.data = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
        self.data["rows"] = [r for r in self.data["rows"] if r["name"] != row["name"]] + [row]
        OUT.write_text(json.dumps(self.data, indent=1))

    def row(self, name: str) -> dict | None:
        return next((r for r in self.data["rows"] if r["name"] == name), None)

    def llama_ppl(self, gguf_path: Path) -> dict:
        out = {}
        for text, npy in self.npy.items():
            res = gguf_path.with_name(gguf_path.name + f".{text}.ppl.json")
            if not res.exists() or res.stat().st_mtime < gguf_path.stat().st_mtime:   # the file was rewritten
                subprocess.run([str(self.py), str(REPO / "benchmarks" / "llamacpp_eval.py"), "ppl", "--model",
                                str(gguf_path), "--windows", str(npy), "--out", str(res)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out[text] = json.loads(res.read_text())["ppl"]
        return out

    def ours_ppl(self, run: Path) -> dict:
        from lowmem_boa.eval.perplexity import streaming_nll
        return {text: streaming_nll(run, ids, torch.device("cpu"), 4 * 2 ** 30)["ppl"]
                for text, ids in self.windows.items()}

    def fresh(self, name: str, gguf_path: Path) -> bool:
        """Whether the row ``name`` describes ``gguf_path`` as it is now; a row of an earlier file whose
        embedding had another type (before ``--kquant-embedding``'s default: F16) is kept, renamed."""
        old = self.row(name)
        if old is None:
            return False
        emb = tensor_types(gguf_path)["token_embd.weight"].name
        was = old.get("embedding") or ("F16" if "F16" in old.get("tensor_types", []) else None)
        if was is None or was == emb:
            return True
        self.data = json.loads(OUT.read_text())
        self.data["rows"] = [r for r in self.data["rows"] if r["name"] not in (name, f"{name} (embedding {was})")]
        self.data["rows"].append({**old, "name": f"{name} (embedding {was})", "embedding": was})
        OUT.write_text(json.dumps(self.data, indent=1))
        return False

    def record(self, name: str, gguf_path: Path, **extra):
        if not self.fresh(name, gguf_path):
            row = {"name": name, "bytes": gguf_path.stat().st_size, **extra,
                   "embedding": tensor_types(gguf_path)["token_embd.weight"].name,
                   "llamacpp_ppl": self.llama_ppl(gguf_path), "windows": self.args.windows, "seqlen": 512}
            self.save_row(row)
            print(json.dumps(row), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="q2_k,q3_k,q4_k")
    ap.add_argument("--methods", default="gptq,boa")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", action="store_true",
                    help="our runs with llama.cpp's own per-layer types of each file type (--kquant-type for the "
                    "layers its mixture promotes, e.g. ffn_down Q3_K in a Q2_K file) instead of one type")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--file-types", action="store_true", help="only: --kquant FILE_TYPE's per-block types against "
                    "llama.cpp's own file of each file type")
    ap.add_argument("--tokenizer", action="store_true", help="only: llama.cpp's tokenization of our GGUF against the "
                    "model's own tokenizer (pre-tokenizer names)")
    ap.add_argument("--archs", action="store_true", help="only: llama.cpp runs a small random model of each "
                    "architecture the GGUF writer names (llama, qwen2, qwen3) as our evaluator does")
    ap.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/llamacpp_check.json)")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default benchmarks/_work/llamacpp)")
    args = ap.parse_args(argv)
    global OUT, WORK
    OUT, WORK = args.out or OUT, args.work or WORK
    if args.report:
        return report()
    from transformers import AutoTokenizer
    from lowmem_boa.data import calibration_windows, load_source
    from lowmem_boa.export.gguf_file import write_llama_gguf
    ck = Check(args)
    if args.tokenizer:
        return tokenizer_check(ck)
    if args.file_types:
        return file_types_check(ck)
    if args.archs:
        return archs_check(ck)
    lib = libggml()
    sd = fp_weights(ck.model)
    f16 = WORK / "smollm2-f16.gguf"
    if not f16.exists():
        write_llama_gguf(ck.model, f16, sd.items(), float_type="f16")
    if ck.row("fp16") is None:
        ck.save_row({"name": "fp16", "bytes": f16.stat().st_size, "ours_ppl": ck.ours_ppl(ck.model),
                     "llamacpp_ppl": ck.llama_ppl(f16), "windows": args.windows, "seqlen": 512})
    tok = AutoTokenizer.from_pretrained(ck.model)
    calib = calibration_windows(tok, load_source("wikitext2", "train", SHARED / "data"), args.nsamples, args.seqlen,
                                args.seed)
    imat = imatrix(ck.model, calib, WORK / f"imatrix-{args.nsamples}x{args.seqlen}-s{args.seed}.npz")
    from lowmem_boa.solvers.kquant import FILE_TYPES, embedding_type
    emb = embedding_type(None, json.loads((ck.model / "config.json").read_text())["hidden_size"])
    for kq in args.types.split(","):
        # llama.cpp's own file type, without and with the importance matrix
        own = WORK / f"llama-{kq}.gguf"
        if not own.exists():
            subprocess.run([str(ck.py), str(REPO / "benchmarks" / "llamacpp_eval.py"), "quantize", "--model", str(f16),
                            "--type", kq, "--out", str(own)], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        check = requantize(lib, ck.model, sd, own, WORK / f"llama-{kq}-requant.gguf", None)
        reproduced = same_tensor_data(check, own)
        types = {str(t.name) for t in tensor_types(own).values()}
        if not ck.fresh(f"llama.cpp {kq} (own types)", own):   # also scored by our evaluator (dequantized)
            from lowmem_boa.export.gguf_file import gguf_to_hf
            back = gguf_to_hf(own, WORK / f"llama-{kq}-hf")
            ck.record(f"llama.cpp {kq} (own types)", own, type=kq, source="llama.cpp", imatrix=False,
                      tensor_types=sorted(types), ggml_quantize_chunk_reproduces_file=reproduced,
                      ours_ppl=ck.ours_ppl(back))
        ck.record(f"llama.cpp {kq} (own types) + imatrix",
                  requantize(lib, ck.model, sd, own, WORK / f"llama-{kq}-imatrix.gguf", imat), type=kq,
                  source="llama.cpp", imatrix=True, tensor_types=sorted(types))
        file_type = kq in FILE_TYPES      # llama.cpp's file type: our run has its per-block types (checked below)
        over = llama_mix(own, ck.model) if args.mix and not file_type else {}
        mix = " llama.cpp mix" if args.mix else ""
        for method in args.methods.split(","):
            run = WORK / f"{method}-{kq}{'-mix' if args.mix else ''}-n{args.nsamples}x{args.seqlen}-s{args.seed}"
            name = f"{method} {kq}{mix}"
            ours_file = run / "gguf" / "model.gguf"
            stale = ours_file.exists() and tensor_types(ours_file)["token_embd.weight"].name.lower() != emb
            if not ours_file.exists() or stale:   # stale: a run before --kquant-embedding (F16): rerun, which
                t0 = time.perf_counter()          # rewrites the checkpoint and the file (its blocks are kept)
                subprocess.run([sys.executable, str(REPO / "run_quant.py"), "--model", str(ck.model), "--method",
                                method, "--kquant", kq, "--export", "gguf", "--nsamples", str(args.nsamples),
                                "--seqlen", str(args.seqlen), "--seed", str(args.seed), "--calib", "wikitext2",
                                "--data-dir", str(SHARED / "data"), "--device", "cpu", "--output", str(run),
                                "--no-progress", *[a for k, t in over.items() for a in ("--kquant-type", f"{k}={t}")]],
                               check=True, stdout=subprocess.DEVNULL)
                if not stale:
                    (run / "quant_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}")
            if not ck.fresh(name, ours_file):
                same, total = bit_exact(run)
                if file_type:
                    extra_types = {"same_tensor_types_as_llama_cpp_file": tensor_types(ours_file) == tensor_types(own)}
                else:
                    extra_types = {}
                ck.record(name, ours_file, type=kq, source=method, imatrix=None, bit_exact_tensors=same, kquant_types=over,
                          quantized_tensors=total, ours_ppl=ck.ours_ppl(run),
                          tensor_types=sorted({str(t.name) for t in tensor_types(ours_file).values()}),
                          quant_seconds=float((run / "quant_seconds.txt").read_text()), **extra_types)
            if file_type:
                continue     # llama.cpp's quantizer on our types = its own file (same types), measured above
            # llama.cpp's quantizer on exactly our file's tensor types (equal size)
            for use_im in (False, True):
                label = f"llama.cpp {kq} (our{mix} types)" + (" + imatrix" if use_im else "")
                path = WORK / f"llama-{kq}-ourtypes{'-mix' if args.mix else ''}{'-imatrix' if use_im else ''}.gguf"
                ck.record(label, requantize(lib, ck.model, sd, ours_file, path, imat if use_im else None), type=kq,
                          source="llama.cpp", imatrix=use_im,
                          tensor_types=sorted({str(t.name) for t in tensor_types(ours_file).values()}))
    report()


def tokenizer_check(ck) -> None:
    """llama.cpp's tokenization of WikiText-2 test and C4 text (the first 300,000 characters / 200 documents)
    with our GGUF's vocabulary and pre-tokenizer name against the model's own (Hugging Face) tokenizer:
    SmolLM2's tokenizer as built here (GPT-2's byte-level regex), and two variants of its tokenizer.json
    (SmolLM's original digits + byte level; Llama 3's and Qwen2's split regexes), each written by ``write_llama_gguf``
    with the name it detects, and the name written before that detection ("default"); then a
    SentencePiece-style vocabulary (Llama 1/2's kind: stories260K's)."""
    import copy
    from transformers import AutoTokenizer
    import lowmem_boa.export.gguf_file as gf
    texts = {"wikitext2": (SHARED / "data" / "wikitext2" / "test.txt").read_text()[:300_000],
             "c4": "\n\n".join(json.loads(line)["text"] for line in
                                (SHARED / "data" / "c4" / "validation-shard0-first1025.jsonl").read_text().splitlines()[:200])}
    tdir = WORK / "tokenizer"
    tdir.mkdir(exist_ok=True)
    for name, text in texts.items():
        (tdir / f"{name}.txt").write_text(text)
    base = json.loads((ck.model / "tokenizer.json").read_text())
    variants = {"as built": base["pre_tokenizer"],
                "digits + byte level": {"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": True}, base["pre_tokenizer"]]},
                "llama 3 split": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": gf.LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
                "qwen2 split": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": gf.QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}}
    sd = fp_weights(ck.model)
    for label, pre in [*variants.items(), ("as built, written as 'default'", base["pre_tokenizer"])]:
        d = tdir / label.replace(" ", "_").replace(",", "").replace("'", "")
        d.mkdir(exist_ok=True)
        for f in ck.model.iterdir():
            if f.name != "tokenizer.json" and not (d / f.name).exists():
                (d / f.name).symlink_to(f)
        tok = copy.deepcopy(base)
        tok["pre_tokenizer"] = pre
        (d / "tokenizer.json").write_text(json.dumps(tok))
        name = gf.pre_tokenizer_name(tok) if "default" not in label else "default"
        path = d / "model.gguf"
        orig = gf.check_gguf_tokenizer
        gf.check_gguf_tokenizer = lambda _dir, name=name: name
        try:
            gf.write_llama_gguf(d, path, sd.items())
        finally:
            gf.check_gguf_tokenizer = orig
        row = {"name": f"tokenizer: {label}", "pre": name,
               "texts": _compare_tokens(ck, path, AutoTokenizer.from_pretrained(d), texts, tdir, d)}
        path.unlink()
        ck.save_row(row)
        print(json.dumps(row), flush=True)
    # SentencePiece-style vocabularies (Llama 1/2): stories260K's (llama2.c's SentencePiece model) with
    # Llama 2's normalizer, written as llama.cpp's "llama" vocabulary; and the same file against
    # stories260K's own tokenizer, whose normalizer drops leading/trailing spaces and collapses runs
    # (SentencePiece's remove_extra_whitespaces: llama.cpp ignores that GGUF key for this vocabulary,
    # so the writer refuses such tokenizers)
    src = SHARED / "models" / "stories260K"
    d = tdir / "sentencepiece"
    d.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name != "tokenizer.json" and not (d / f.name).exists():
            (d / f.name).symlink_to(f)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": gf.SPM_SPACE}, {"type": "Replace", "pattern": {"String": " "}, "content": gf.SPM_SPACE}]}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    path = d / "model.gguf"
    gf.write_llama_gguf(d, path, fp_weights(src).items(), float_type="f32")
    for label, hf_dir in (("SentencePiece (stories260K), Llama 2's normalizer", d),
                          ("SentencePiece (stories260K) as built: remove_extra_whitespaces (refused)", src)):
        row = {"name": f"tokenizer: {label}", "pre": "llama (SentencePiece)",
               "texts": _compare_tokens(ck, path, AutoTokenizer.from_pretrained(hf_dir), texts, tdir, d)}
        ck.save_row(row)
        print(json.dumps(row), flush=True)
    path.unlink()


def _compare_tokens(ck, gguf_path: Path, hf, texts: dict, tdir: Path, work: Path) -> dict:
    """llama.cpp's ids for each text (special-token strings in the text read as text, as llama.cpp's
    ``tokenize(special=False)`` does; transformers' ``split_special_tokens``) against ``hf``'s."""
    res = {}
    for tname in texts:
        out = work / f"{tname}.npy"
        subprocess.run([str(ck.py), str(REPO / "benchmarks" / "llamacpp_eval.py"), "tokenize", "--model", str(gguf_path),
                        "--text", str(tdir / f"{tname}.txt"), "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        a = np.asarray(hf((tdir / f"{tname}.txt").read_text(), add_special_tokens=False,
                          split_special_tokens=True)["input_ids"])
        b = np.load(out)
        n = min(len(a), len(b))
        diff = np.nonzero(a[:n] != b[:n])[0]
        res[tname] = {"hf_tokens": int(len(a)), "llamacpp_tokens": int(len(b)),
                      "equal": bool(len(a) == len(b) and len(diff) == 0),
                      "first_difference": int(diff[0]) if len(diff) else (None if len(a) == len(b) else n)}
    return res


def archs_check(ck) -> None:
    """Each architecture the GGUF writer names (llama, qwen2 with its q/k/v biases, qwen3 with its q/k norms
    and a head size of its own) loaded by llama.cpp: a small random model of each (tests/tiny_models.py,
    2 blocks, float32 file), perplexity by llama.cpp against our evaluator on the same 8 windows of 128
    WikiText-2 test tokens. Random weights are the hard case: any mismatch in names, head layout or
    rotary order changes the logits."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import TOKENIZER_SRC, save_tiny_model
    from transformers import AutoTokenizer
    from lowmem_boa.eval.perplexity import streaming_nll
    from lowmem_boa.export.gguf_file import write_llama_gguf
    tok = AutoTokenizer.from_pretrained(TOKENIZER_SRC)
    ids = tok((SHARED / "data" / "wikitext2" / "test.txt").read_text()[:20_000], add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: 8 * 128]).reshape(8, 128)
    adir = WORK / "archs"
    adir.mkdir(exist_ok=True)
    npy = adir / "wikitext2-8x128.npy"
    np.save(npy, windows.numpy())
    for fam in ("llama", "qwen2", "qwen3"):
        d = save_tiny_model(fam, adir / fam, seed=7)
        path = write_llama_gguf(d, adir / f"{fam}.gguf", fp_weights(d).items(), float_type="f32")
        res = adir / f"{fam}.ppl.json"
        subprocess.run([str(ck.py), str(REPO / "benchmarks" / "llamacpp_eval.py"), "ppl", "--model", str(path),
                        "--windows", str(npy), "--out", str(res)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        theirs = json.loads(res.read_text())["ppl"]
        ours = streaming_nll(d, windows, torch.device("cpu"), 2 ** 30)["ppl"]
        row = {"name": f"arch: {fam}", "ours": ours, "llamacpp": theirs, "relative_difference": theirs / ours - 1,
               "windows": 8, "seqlen": 128}
        ck.save_row(row)
        print(json.dumps(row), flush=True)


def file_types_check(ck) -> None:
    """llama.cpp's own file of each of its file types (``llama_model_quantize`` of the F16 GGUF) against
    ``--kquant FILE_TYPE``'s per-block types (``solvers.kquant.llama_file_type_overrides`` + fallbacks):
    every linear of every block. The types llama.cpp chose are kept in
    ``benchmarks/results/llamacpp_file_types.json`` (tests/test_kquant.py checks our rules against them)."""
    from lowmem_boa.export.gguf_file import gguf_name
    from lowmem_boa.solvers.kquant import FILE_TYPES, layer_type, llama_file_type_overrides
    cfg = json.loads((ck.model / "config.json").read_text())
    n, gqa = cfg["num_hidden_layers"], cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    cols = {"self_attn.q_proj": cfg["hidden_size"], "self_attn.k_proj": cfg["hidden_size"],
            "self_attn.v_proj": cfg["hidden_size"], "self_attn.o_proj": cfg["num_attention_heads"] * head,
            "mlp.gate_proj": cfg["hidden_size"], "mlp.up_proj": cfg["hidden_size"], "mlp.down_proj": cfg["intermediate_size"]}
    f16 = WORK / "smollm2-f16.gguf"
    path = REPO / "benchmarks" / "results" / "llamacpp_file_types.json"
    out = {"model": "smollm2-135m", "llama_cpp_python": "0.3.36", "n_blocks": n, "n_gqa": gqa, "in_features": cols,
           "file_types": {}}
    for ft in FILE_TYPES:
        own = WORK / f"llama-{ft}-types.gguf"
        if not own.exists():
            subprocess.run([str(ck.py), str(REPO / "benchmarks" / "llamacpp_eval.py"), "quantize", "--model", str(f16),
                            "--type", ft, "--out", str(own)], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        theirs = {k: t.name.lower() for k, t in tensor_types(own).items()}
        over = llama_file_type_overrides(ft, list(cols), n, gqa)
        ours = {gguf_name(f"model.layers.{i}.{name}.weight"): layer_type(ft, c, name, over, i)
                for i in range(n) for name, c in cols.items()}
        differ = sorted(k for k in ours if ours[k] != theirs.get(k))
        out["file_types"][ft] = {"llama_cpp": {k: theirs[k] for k in sorted(ours)},
                                 "embedding": theirs.get("token_embd.weight"), "bytes": own.stat().st_size}
        print(f"{ft}: {len(ours) - len(differ)}/{len(ours)} linear tensors of the same type as llama.cpp's own file"
              + (f"; differ: {', '.join(f'{k} ours {ours[k]} llama.cpp {theirs.get(k)}' for k in differ[:6])}"
                 if differ else ""), flush=True)
        own.unlink()
    path.write_text(json.dumps(out, indent=1))


def report():
    data = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
    print("| file | size (MB) | embedding | llama.cpp WikiText-2 | llama.cpp C4 | ours WikiText-2 | ours C4 | bit-exact |")
    print("|---|---|---|---|---|---|---|---|")

    def num(d, k):
        return f"{d[k]:.3f}" if k in d else "–"
    for r in data["rows"]:
        if "bytes" not in r:
            continue
        lp, op = r.get("llamacpp_ppl", {}), r.get("ours_ppl", {})
        be = f"{r['bit_exact_tensors']}/{r['quantized_tensors']}" if "bit_exact_tensors" in r else ""
        types = r.get("tensor_types")
        # rows written before the key: the embedding is the file's only F16 (or, failing that, Q8_0) tensor
        emb = r.get("embedding") or ("F16" if not types or "F16" in types else "Q8_0" if "Q8_0" in types else "–")
        print(f"| {r['name']} | {r['bytes'] / 1e6:.1f} | {emb} | {num(lp, 'wikitext2')} | {num(lp, 'c4')} | "
              f"{num(op, 'wikitext2')} | {num(op, 'c4')} | {be} |")

    def section(prefix: str, header: list, cells) -> None:   # the rows named "PREFIX…", one table
        rows = [r for r in data["rows"] if r["name"].startswith(prefix)]
        if rows:
            print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            for r in rows:
                print("| " + " | ".join([r["name"][len(prefix):], *cells(r)]) + " |")

    def tokens(t):
        return (f"{t['hf_tokens']:,} / {t['llamacpp_tokens']:,} "
                + ("(identical)" if t["equal"] else f"(first difference at token {t['first_difference']})"))
    section("arch: ", ["architecture (random 2-block model, float32 file)", "ours", "llama.cpp", "difference"],
            lambda r: [f"{r['ours']:.4f}", f"{r['llamacpp']:.4f}", f"{100 * r['relative_difference']:+.4f} %"])
    section("tokenizer: ", ["tokenizer (tokenizer.json)", "written as", "WikiText-2: ours / llama.cpp tokens",
                            "C4: ours / llama.cpp tokens"],
            lambda r: [r["pre"], tokens(r["texts"]["wikitext2"]), tokens(r["texts"]["c4"])])

if __name__ == "__main__":
    main()
