"""GGUF container for llama.cpp (``export.gguf_file``) and ``run_eval.py`` on GGUF files: names, q/k
row permutation, metadata and tokenizer survive a round trip through the ``gguf`` reader and
transformers' GGUF loader bit for bit; unsupported models and bad files are refused up front."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowmem_boa.export.gguf_file import (GGUFExportError, check_gguf_exportable, gguf_name, gguf_to_hf, permute_rows,
                                         unpermute_rows, write_llama_gguf)

from tiny_models import DATA, REPO, needs_shared, run_quant_in_process, save_tiny_model, smollm2_dir


def test_permutation_is_llama_cpp_rotary_order_and_invertible():
    """Within each head the rows become [0, dh/2, 1, dh/2 + 1, ...]; unpermute undoes it."""
    n_head, dh = 3, 8
    w = torch.arange(n_head * dh, dtype=torch.float32).unsqueeze(1).repeat(1, 5)
    p = permute_rows(w, n_head)
    head0 = p[:dh, 0].tolist()
    assert head0 == [0, 4, 1, 5, 2, 6, 3, 7]
    assert p[dh:2 * dh, 0].tolist() == [8 + x for x in head0]
    assert torch.equal(unpermute_rows(p, n_head), w)


def test_names_and_refusals():
    assert gguf_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"
    assert gguf_name("model.layers.12.mlp.down_proj.weight") == "blk.12.ffn_down.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("model.layers.2.self_attn.q_proj.bias") == "blk.2.attn_q.bias"          # Qwen2
    assert gguf_name("model.layers.2.self_attn.k_norm.weight") == "blk.2.attn_k_norm.weight"  # Qwen3
    with pytest.raises(GGUFExportError, match="no GGUF name"):
        gguf_name("model.layers.0.self_attn.o_proj.bias")
    with pytest.raises(GGUFExportError, match="Llama, Qwen2 and Qwen3"):
        check_gguf_exportable({"model_type": "opt"})
    with pytest.raises(GGUFExportError, match="sliding-window"):
        check_gguf_exportable({"model_type": "qwen2", "use_sliding_window": True})
    with pytest.raises(GGUFExportError, match="rope scaling 'llama3'"):
        check_gguf_exportable({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})


def test_pre_tokenizer_names_are_llama_cpps_and_unknown_ones_are_refused():
    """``tokenizer.ggml.pre`` picks llama.cpp's regexes: each name here was checked against the model's own
    tokenizer on WikiText-2 and C4 text through llama.cpp (``benchmarks/llamacpp_check.py --tokenizer``:
    identical ids; "default", written before, splits SmolLM2's text into 16 % more tokens)."""
    from lowmem_boa.export.gguf_file import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name
    byte = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte]}}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**byte, "use_regex": False}]}}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {**byte, "use_regex": False}]}}) == "qwen2"
    for pre in ({"type": "Metaspace", "replacement": "▁"}, {**byte, "add_prefix_space": True}, None,
                {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": r"\s+"}},
                                                       {**byte, "use_regex": False}]}):
        with pytest.raises(GGUFExportError, match="pre-tokenizer"):
            pre_tokenizer_name({"pre_tokenizer": pre})


def _round_trip(model_dir, tmp_path, float_type):
    sd = load_file(model_dir / "model.safetensors")
    path = write_llama_gguf(model_dir, tmp_path / "m.gguf", sd.items(), float_type=float_type)
    back = gguf_to_hf(path, tmp_path / "back")
    return sd, path, back, load_file(back / "model.safetensors")


@needs_shared
def test_tiny_llama_round_trip_is_exact(tmp_path):
    import gguf
    from transformers import AutoTokenizer
    model = save_tiny_model("llama", tmp_path / "m", seed=3)
    sd, path, back, sd2 = _round_trip(model, tmp_path, "f32")
    assert set(sd) == set(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    # in the file itself: llama.cpp's names, shapes and the permuted q rows
    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    q = torch.from_numpy(t["blk.0.attn_q.weight"].data.copy())
    assert torch.equal(q, permute_rows(sd["model.layers.0.self_attn.q_proj.weight"], 4))
    assert r.fields["llama.attention.head_count_kv"].parts[-1][0] == 2
    assert bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"   # its byte-level GPT-2 regex
    text = "The quick brown fox, 1234 jumps.\n  Over <pad> the lazy dog"
    assert AutoTokenizer.from_pretrained(model)(text)["input_ids"] == AutoTokenizer.from_pretrained(back)(text)["input_ids"]


def _eval_ppl(model, json_path) -> float:
    """run_eval.py's WikiText-2 perplexity of ``model`` (a directory or a .gguf file) on 4 windows of 64."""
    r = subprocess.run([sys.executable, str(REPO / "run_eval.py"), "--model", str(model), "--datasets", "wikitext2",
                        "--data-dir", DATA, "--seqlen", "64", "--max-windows", "4", "--device", "cpu",
                        "--json", str(json_path), "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(json_path.read_text())["perplexity"]["wikitext2"]["ppl"]


@needs_shared
def test_run_eval_reads_a_gguf_file_like_its_directory(tmp_path):
    model = save_tiny_model("llama", tmp_path / "m", seed=4)
    sd = load_file(model / "model.safetensors")
    path = write_llama_gguf(model, tmp_path / "m.gguf", sd.items(), float_type="f32")
    assert _eval_ppl(model, tmp_path / "dir.json") == _eval_ppl(path, tmp_path / "gguf.json")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(64))
    for bad, msg in ((tmp_path / "missing.gguf", "no such GGUF file"), (tmp_path / "fake.gguf", "no GGUF magic")):
        r = subprocess.run([sys.executable, str(REPO / "run_eval.py"), "--model", str(bad), "--data-dir", DATA],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


@needs_shared
def test_smollm2_f16_gguf_round_trip(tmp_path):
    """The real model (GQA 9/3, tied embeddings, RoPE theta 1e5, its byte-level BPE): the float16
    checkpoint comes back bit for bit with its config, and WikiText-2 text tokenizes identically."""
    from transformers import AutoTokenizer
    src = smollm2_dir()
    sd, path, back, sd2 = _round_trip(src, tmp_path, "f16")
    assert set(sd) == set(sd2)
    for k in sd:
        assert torch.equal(sd[k].float(), sd2[k].float()), k
    c1, c2 = (json.loads((d / "config.json").read_text()) for d in (src, back))
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size", "rms_norm_eps",
                "tie_word_embeddings", "vocab_size", "max_position_embeddings"):
        assert c1[key] == c2[key], key
    assert c1["rope_parameters"]["rope_theta"] == c2["rope_parameters"]["rope_theta"] == 100000.0
    text = (REPO.parent / "shared" / "data" / "wikitext2" / "test.txt").read_text()[:20000]
    assert AutoTokenizer.from_pretrained(src)(text)["input_ids"] == AutoTokenizer.from_pretrained(back)(text)["input_ids"]


def _llama256(path, intermediate=512, hidden=256):
    """A one-block Llama whose linears have ``hidden`` / ``intermediate`` inputs (k-quants need 256s)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from tiny_models import TOKENIZER_SRC
    import shutil
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_SRC / f, path / f)
    return path


@needs_shared
@pytest.mark.parametrize("method,kq", [("gptq", "q2_k"), ("boa", "q3_k"), ("gptq", "q4_k"), ("boa", "q6_k")])
def test_kquant_weights_in_a_gguf_file_are_the_solvers_bit_for_bit(tmp_path, method, kq):
    """GPTQ/BoA on k-quant grids, written as GGUF blocks (q/k rows permuted with their fields): the
    ``gguf`` reader's dequantization of the file and transformers' GGUF loader give back exactly the
    solver's weights."""
    import gguf
    from lowmem_boa.export.gguf_file import KQuantTensor
    from lowmem_boa.solvers import boa_quantize, gptq_quantize
    model = _llama256(tmp_path / "m")
    sd = load_file(model / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    tensors, solved = [], {}
    for name, t in sd.items():
        if name.startswith("model.layers.") and t.dim() == 2:
            C = t.shape[1]
            X = torch.randn(C, 2 * C, generator=g)
            H = X @ X.T / (2 * C)
            if method == "boa":
                heads = 4 if "q_proj" in name or "o_proj" in name else 2 if ("k_proj" in name or "v_proj" in name) else 4
                dh = t.shape[0] // heads
                A = torch.randn(heads, dh, dh, generator=g)
                res = boa_quantize(t, H, A @ A.transpose(1, 2) / dh + torch.eye(dh), heads, 0, kquant=kq, joint_rows=8)
            else:
                res = gptq_quantize(t, H, 0, kquant=kq)
            solved[name] = res.Q
            tensors.append((name, KQuantTensor(res.codes, res.kquant)))
        else:
            tensors.append((name, t))
    path = write_llama_gguf(model, tmp_path / "q.gguf", tensors, float_type="f32")
    r = gguf.GGUFReader(path)
    by_name = {x.name: x for x in r.tensors}
    qtype = getattr(gguf.GGMLQuantizationType, kq.upper())
    for name, Q in solved.items():
        x = by_name[gguf_name(name)]
        assert x.tensor_type == qtype
        w = torch.from_numpy(gguf.quants.dequantize(x.data, x.tensor_type).copy()).reshape(Q.shape)
        heads = 4 if "q_proj" in name else 2 if "k_proj" in name else None
        assert torch.equal(unpermute_rows(w, heads) if heads else w, Q), name
    back = load_file(gguf_to_hf(path, tmp_path / "back") / "model.safetensors")
    for name, Q in solved.items():
        assert torch.equal(back[name], Q), name


@needs_shared
def test_raw_blocks_and_bfloat16_floats(tmp_path):
    """Blocks quantized elsewhere (``RawGGUFTensor``, rows in Hugging Face order, e.g. llama.cpp's own
    quantizer in benchmarks/llamacpp_check.py) are written exactly as the solver's own ``KQuantTensor``
    (q/k rows permuted as whole rows); ``float_type="bf16"`` stores the float matrices as BF16."""
    import gguf
    from lowmem_boa.export.gguf_file import KQuantTensor, RawGGUFTensor
    from lowmem_boa.solvers import gptq_quantize
    model = _llama256(tmp_path / "m")
    sd = load_file(model / "model.safetensors")
    mine, raw = [], []
    for name, t in sd.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "down_proj.weight")):
            res = gptq_quantize(t, torch.eye(t.shape[1]), 0, kquant="q4_k")
            kq = KQuantTensor(res.codes, res.kquant)
            blocks, qtype = kq.blocks()
            mine.append((name, kq))
            raw.append((name, RawGGUFTensor(blocks, qtype.name)))
        else:
            mine.append((name, t))
            raw.append((name, t))
    a = {x.name: x for x in gguf.GGUFReader(write_llama_gguf(model, tmp_path / "a.gguf", mine)).tensors}
    b = {x.name: x for x in gguf.GGUFReader(write_llama_gguf(model, tmp_path / "b.gguf", raw, "bf16")).tensors}
    for name, t in sd.items():
        x, y = a[gguf_name(name)], b[gguf_name(name)]
        if name.endswith(("q_proj.weight", "k_proj.weight", "down_proj.weight")):
            assert y.tensor_type == gguf.GGMLQuantizationType.Q4_K
            assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), name
        elif t.dim() == 2:
            assert y.tensor_type == gguf.GGMLQuantizationType.BF16
            w = torch.from_numpy(gguf.quants.dequantize(y.data, y.tensor_type).copy()).reshape(t.shape)
            heads = 4 if "q_proj" in name else 2 if "k_proj" in name else None
            assert torch.equal(unpermute_rows(w, heads) if heads else w, t.to(torch.bfloat16).float()), name


def _run(args, timeout=900):
    return subprocess.run([sys.executable, str(REPO / "run_quant.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@needs_shared
@pytest.mark.parametrize("method,kq,hidden,over,emb,whole", [
    ("boa", "q2_k", 256, {"mlp.down_proj": "q3_k", "0.self_attn.v_proj": "q8_0"}, None, True),
    ("gptq", "q4_k_m", 256, {}, "q4_k", False), ("boa", "q3_k", 96, {}, None, False),
    ("gptq", "q6_k", 96, {}, "float", False)])
def test_run_quant_kquant_exports_a_gguf_that_evaluates_like_the_run(tmp_path, method, kq, hidden, over, emb, whole):
    """``run_quant.py --kquant TYPE --export gguf``: the GGUF file's weights are the fake-quantized
    checkpoint's bit for bit in every case; on the first (``whole``: each run_eval.py or run_quant.py
    process costs ~10 s of imports) run_eval.py gives the same perplexity on both and a run whose last
    block file is damaged resumes to the same file. With a
    hidden size of 96 every layer but down_proj falls back to its 32-column type (Q4_0, Q8_0);
    ``--kquant-type LAYER=TYPE`` gives a layer of every block its own type (llama.cpp's type mixtures).
    The token embedding (tied head) is rounded to llama.cpp's output-head type by default (Q6_K; Q8_0
    where the hidden size is not a multiple of 256), in the checkpoint as in the file, or
    ``--kquant-embedding TYPE`` / ``float``."""
    import gguf
    model = _llama256(tmp_path / "m", hidden=hidden)
    out = tmp_path / "q"
    args = ["--model", str(model), "--method", method, "--kquant", kq, "--nsamples", "4", "--seqlen", "64",
            "--data-dir", DATA, "--device", "cpu", "--output", str(out), "--export", "gguf", "--no-progress"]
    for layer, t in over.items():
        args += ["--kquant-type", f"{layer}={t}"]
    if emb:
        args += ["--kquant-embedding", emb]
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    gguf_file = out / "gguf" / "model.gguf"
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(gguf_file).tensors}
    base = kq[:4]
    fallback = {"q3_k": "q4_0", "q6_k": "q8_0", "q2_k": "q4_0", "q4_k": "q5_0"}[base]
    # llama.cpp's Q4_K_M in a one-block model: attn_v and ffn_down Q6_K (its last eighth of the blocks)
    rules = {"mlp.down_proj": "q6_k", "self_attn.v_proj": "q6_k"} if kq == "q4_k_m" else {}
    mine = {**rules, **{k.split(".", 1)[1] if k[0].isdigit() else k: v for k, v in over.items()}}
    assert types["blk.0.ffn_down.weight"] == mine.get("mlp.down_proj", base)
    assert types["blk.0.attn_v.weight"] == mine.get("self_attn.v_proj", base if hidden % 256 == 0 else fallback)
    assert types["blk.0.attn_q.weight"] == (base if hidden % 256 == 0 else fallback)
    assert types["token_embd.weight"] == {None: "q6_k" if hidden % 256 == 0 else "q8_0", "float": "f32"}.get(emb, emb)
    assert "output.weight" not in types                  # tied: llama.cpp uses token_embd for the head
    ftype = gguf.GGUFReader(gguf_file).fields["general.file_type"].parts[-1][0]
    assert gguf.LlamaFileType(ftype).name == {"q2_k": "MOSTLY_Q2_K", "q4_k_m": "MOSTLY_Q4_K_M", "q3_k": "MOSTLY_Q3_K_S",
                                              "q6_k": "MOSTLY_Q6_K"}[kq]
    fake = load_file(out / "model.safetensors")
    back = load_file(gguf_to_hf(gguf_file, tmp_path / "back") / "model.safetensors")
    for k, v in fake.items():
        assert torch.equal(back[k], v), k
    if not whole:
        return
    assert _eval_ppl(out, tmp_path / "fake.json") == _eval_ppl(gguf_file, tmp_path / "gguf.json")
    first = gguf_file.read_bytes()
    blk = out / "quant_state" / "block_0000.safetensors"
    blk.write_bytes(blk.read_bytes()[:100])
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert gguf_file.read_bytes() == first


@needs_shared
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_kquant_gguf_is_the_run_bit_for_bit(tmp_path, family):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms, a head size of its own) as llama.cpp's qwen2 / qwen3
    architectures: q/k rows as they are (their rotary halves are already llama.cpp's NeoX order), biases
    and norms under llama.cpp's names; the k-quant weights (here the 32-column fallback of Q4_K) are the
    fake-quantized checkpoint's bit for bit, and the file evaluates like the run. (llama.cpp itself runs
    all three architectures as our evaluator does: ``benchmarks/llamacpp_check.py --archs``.)"""
    import gguf
    from tiny_models import save_tiny_model
    from lowmem_boa.export.gguf_file import QWEN2_SPLIT, check_gguf_tokenizer
    model = save_tiny_model(family, tmp_path / "m", seed=2)
    tok = json.loads((model / "tokenizer.json").read_text())       # Qwen's own pre-tokenizer, as Qwen models ship
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    assert check_gguf_tokenizer(model) == "qwen2"
    out = tmp_path / "q"
    r = _run(["--model", str(model), "--method", "boa", "--kquant", "q4_k", "--nsamples", "4", "--seqlen", "64",
              "--data-dir", DATA, "--device", "cpu", "--output", str(out), "--export", "gguf", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    gguf_file = out / "gguf" / "model.gguf"
    reader = gguf.GGUFReader(gguf_file)
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == family
    assert types["blk.0.attn_q.weight"] == "q5_0" and types["output.weight"] == "q8_0"
    extra = ["blk.1.attn_q.bias", "blk.1.attn_v.bias"] if family == "qwen2" else ["blk.1.attn_q_norm.weight"]
    assert all(types[n] == "f32" for n in extra)
    fake = load_file(out / "model.safetensors")
    back = load_file(gguf_to_hf(gguf_file, tmp_path / "back") / "model.safetensors")
    assert set(back) == set(fake)
    for k, v in fake.items():
        assert torch.equal(back[k], v), k
    assert _eval_ppl(out, tmp_path / "fake.json") == _eval_ppl(gguf_file, tmp_path / "gguf.json")


@needs_shared
def test_kquant_refusals_come_before_any_work(tmp_path, capsys):
    """Each bad k-quant option is refused with exit status 2 and its message, and no output directory is
    made (run_quant.py's ``main`` in this process: ``run_quant_in_process``)."""

    def _run(args):
        return run_quant_in_process(args, capsys)
    model = _llama256(tmp_path / "m", intermediate=520)      # down_proj: 520 inputs, not a multiple of 32
    base = ["--nsamples", "2", "--seqlen", "32", "--data-dir", DATA, "--device", "cpu"]
    r = _run(["--model", str(model), "--kquant", "q4_k", "--output", str(tmp_path / "a"), *base])
    assert r.returncode == 2 and "not a multiple of 32" in r.stderr and not (tmp_path / "a").exists(), r.stderr
    model = _llama256(tmp_path / "m2")
    for extra, msg in ((["--export", "gguf"], "add --kquant"), (["--kquant", "q4_k", "--export", "gptq"], "only to gguf"),
                       (["--kquant", "q4_k", "--sym"], "cannot be combined with --sym"),
                       (["--kquant", "q9_k"], "--kquant must be one of"),
                       (["--kquant", "q4_k", "--kquant-type", "mlp.nope=q3_k"], "no layer mlp.nope"),
                       (["--kquant", "q4_k_m", "--kquant-type", "7.mlp.down_proj=q3_k"], "no layer 7.mlp.down_proj"),
                       (["--kquant-embedding", "q8_0"], "add --kquant"),
                       (["--kquant", "q4_k", "--kquant-embedding", "q9_0"], "--kquant-embedding must be one of")):
        out = tmp_path / ("o" + str(abs(hash(msg)) % 1000))
        r = _run(["--model", str(model), "--output", str(out), *base, *extra])
        assert r.returncode == 2 and msg in r.stderr and not out.exists(), (extra, r.stderr[-1500:])
    tok = json.loads((model / "tokenizer.json").read_text())         # a pre-tokenizer llama.cpp has no name for
    for pre, msg in (({"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, tok["pre_tokenizer"]]},
                      "pre-tokenizer (Whitespace, ByteLevel)"),
                     ({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False},
                      "without byte fallback")):       # SentencePiece spaces on a byte-level vocabulary
        (model / "tokenizer.json").write_text(json.dumps({**tok, "pre_tokenizer": pre}))
        r = _run(["--model", str(model), "--kquant", "q4_k", "--export", "gguf", "--output", str(tmp_path / "c"), *base])
        assert r.returncode == 2 and msg in r.stderr and not (tmp_path / "c").exists(), r.stderr
    model = _llama256(tmp_path / "m3", hidden=96)
    r = _run(["--model", str(model), "--kquant", "q4_k", "--kquant-embedding", "q6_k", "--output", str(tmp_path / "b"),
              *base])
    assert r.returncode == 2 and "--kquant-embedding q6_k" in r.stderr and not (tmp_path / "b").exists(), r.stderr


def _llama_cpp_spm(text: str, tokens: list, scores: list, types: list, add_space_prefix: bool) -> list:
    """llama.cpp's SentencePiece tokenizer (``llm_tokenizer_spm``), a slow reference: spaces become ``▁``
    (one in front with ``add_space_prefix``), the text splits into characters, and the adjacent pair whose
    union is the highest-scoring token merges first (the leftmost on a tie) until no union is a token;
    a character that is no token becomes its UTF-8 bytes' ``<0xXX>`` tokens."""
    import heapq
    ids = {t: i for i, t in enumerate(tokens)}
    text = ("▁" if add_space_prefix else "") + text.replace(" ", "▁")
    sym = list(text)
    alive = [True] * len(sym)
    nxt, prv = list(range(1, len(sym) + 1)), list(range(-1, len(sym) - 1))
    heap = []

    def push(left):
        right = nxt[left] if left >= 0 else -1
        if left < 0 or right >= len(sym):
            return
        i = ids.get(sym[left] + sym[right])
        if i is not None:
            heapq.heappush(heap, (-scores[i], left, right, sym[left] + sym[right]))
    for k in range(len(sym) - 1):
        push(k)
    while heap:
        _, left, right, union = heapq.heappop(heap)
        if not (alive[left] and alive[right]) or nxt[left] != right or sym[left] + sym[right] != union:
            continue
        sym[left], alive[right] = union, False
        nxt[left] = nxt[right]
        if nxt[right] < len(sym):
            prv[nxt[right]] = left
        push(prv[left])
        push(left)
    out = []
    for k in range(len(sym)):
        if alive[k]:
            if sym[k] in ids:
                out.append(ids[sym[k]])
            else:
                byte_ids = {t: i for i, t in enumerate(tokens) if types[i] == 6}
                out.extend(byte_ids[f"<0x{b:02X}>"] for b in sym[k].encode())
    return out


def _stories_with_normalizer(tmp_path, normalizer, pre_tokenizer=None):
    import shutil
    src = REPO.parent / "shared" / "models" / "stories260K"
    d = tmp_path / "stories"
    shutil.copytree(src, d)
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["normalizer"], tok["pre_tokenizer"] = normalizer, pre_tokenizer
    (d / "tokenizer.json").write_text(json.dumps(tok))
    return d


LLAMA2_NORMALIZER = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                         {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}


@needs_shared
def test_sentencepiece_tokenizer_is_written_as_llama_cpps_llama_vocabulary(tmp_path):
    """A SentencePiece-style tokenizer (Llama 1/2: ``▁`` spaces, byte fallback; here stories260K's vocabulary
    with Llama 2's normalizer) is written as llama.cpp's "llama" vocabulary: byte tokens typed BYTE, scores
    from the merge order, the space prefix flag. llama.cpp's tokenizer algorithm (a slow reference of it)
    on that vocabulary gives the model's own ids on TinyStories and WikiText-2 text; so does the tokenizer
    transformers' GGUF loader rebuilds from the file, but for a text's leading space. (llama.cpp itself: ``benchmarks/llamacpp_check.py --tokenizer``.)"""
    import gguf
    from transformers import AutoTokenizer
    from lowmem_boa.export.gguf_file import check_gguf_tokenizer
    d = _stories_with_normalizer(tmp_path, LLAMA2_NORMALIZER)
    assert check_gguf_tokenizer(d) == "llama"
    sd = load_file(d / "model.safetensors")
    path = write_llama_gguf(d, tmp_path / "s.gguf", sd.items(), float_type="f32")
    r = gguf.GGUFReader(path)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.add_space_prefix") is True
    tokens, scores, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"), field("tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert all(types[i] == gguf.TokenType.BYTE for i in range(3, 259)) and tokens[3] == "<0x00>"
    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    made = list(dict.fromkeys(tokens.index("".join(m)) for m in merges[:20]))   # a token two merges make: once
    assert all(scores[a] > scores[b] for a, b in zip(made, made[1:]))       # the first merges first
    hf = AutoTokenizer.from_pretrained(d)
    texts = [(DATA + "/tinystories/validation.txt", 6000), (DATA + "/wikitext2/test.txt", 6000)]
    for f, n in texts:
        text = open(f).read()[:n] + " ünïcödé ∑ 日本"
        want = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert _llama_cpp_spm(text, tokens, scores, types, True) == want, f
    # transformers' GGUF loader rebuilds it as a Metaspace "first" tokenizer, which adds no second ▁ in
    # front of a text that starts with a space (the model and llama.cpp do): equal on everything else
    back = AutoTokenizer.from_pretrained(gguf_to_hf(path, tmp_path / "back"))
    for f, n in texts:
        text = open(f).read()[:n].lstrip(" ")
        assert back(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
            hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_sentencepiece_normalizers_llama_cpp_cannot_apply_are_refused(tmp_path):
    """Llama 2's two tokenizer.json forms (legacy normalizer; Metaspace without splitting) are accepted with
    the space prefix; a Metaspace that splits words, and SentencePiece's remove_extra_whitespaces
    (llama2.c's tokenizers: llama.cpp ignores that key for this vocabulary), are refused before any work."""
    from lowmem_boa.export.gguf_file import sentencepiece_options
    assert sentencepiece_options({"normalizer": LLAMA2_NORMALIZER}) == {"add_space_prefix": True}
    meta = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    assert sentencepiece_options({"pre_tokenizer": meta}) == {"add_space_prefix": True}
    assert sentencepiece_options({"pre_tokenizer": {**meta, "prepend_scheme": "never"}}) == {"add_space_prefix": False}
    assert sentencepiece_options({"pre_tokenizer": {"type": "ByteLevel"}}) is None
    with pytest.raises(GGUFExportError, match="splits words"):
        sentencepiece_options({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}})
    stories = json.loads((REPO.parent / "shared" / "models" / "stories260K" / "tokenizer.json").read_text()) \
        if (REPO.parent / "shared" / "models" / "stories260K").is_dir() else {"normalizer": {
            "type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
                                                *LLAMA2_NORMALIZER["normalizers"]]}}
    with pytest.raises(GGUFExportError, match="remove_extra_whitespaces"):
        sentencepiece_options(stories)
