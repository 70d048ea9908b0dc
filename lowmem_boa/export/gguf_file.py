"""GGUF files for llama.cpp: the container, names, metadata and tokenizer of a Llama, Qwen2 or Qwen3
model, and the way back to a Hugging Face directory.

``write_llama_gguf`` writes a model directory's weights as llama.cpp's converter would
(``convert_hf_to_gguf.py``): GGUF names (``blk.N.attn_q.weight`` ...; Qwen2's q/k/v biases, Qwen3's q/k
norms), for Llama q/k rows permuted to llama.cpp's rotary layout (within each head, the two halves
interleaved; Qwen's rows stay in their NeoX order), norms in float32, the other
tensors in float16, bfloat16 or float32, the tied output head omitted, the hyper-parameters llama.cpp reads
and the tokenizer: byte-level BPE (Llama 3, SmolLM2: ``tokenizer.ggml.model = gpt2``, tokens, types,
merges, the pre-tokenizer named as llama.cpp names it, so that it splits text as the model's tokenizer
does) or SentencePiece-style BPE (Llama 1/2: ``llama``, tokens, byte tokens, scores in merge order,
the space prefix), with special ids and chat template; any other tokenizer is refused before work.
Weights solved on a k-quant grid (``KQuantTensor``: codes and stored fields from ``gptq_quantize`` /
``boa_quantize`` with ``kquant=``) are written as their GGUF blocks, q/k rows permuted with their
fields; the float16 file is also what llama.cpp's own quantizer starts from.

``gguf_to_hf`` reads a GGUF (any type the ``gguf`` package dequantizes: every k-quant included)
back into a Hugging Face directory through transformers' GGUF loader, for ``run_eval.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# transformers model_type -> the GGUF architecture written (llama.cpp's converter: LlamaModel, Qwen2Model,
# Qwen3Model); llama.cpp's "llama" rotates interleaved halves (q/k rows permuted), qwen2/qwen3 as
# transformers does (NeoX order, rows as they are)
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",        # Qwen2
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",   # Qwen3
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


class GGUFExportError(ValueError):
    pass


def gguf_name(hf_name: str) -> str:
    """Hugging Face parameter name of a Llama / Qwen2 / Qwen3 model -> llama.cpp's tensor name."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        rest = ".".join(parts[3:])
        if rest in _BLOCK_NAMES:
            return f"blk.{int(parts[2])}.{_BLOCK_NAMES[rest]}"
    raise GGUFExportError(f"no GGUF name for tensor '{hf_name}' (Llama, Qwen2, Qwen3 architectures)")


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each of ``n_head`` heads the rotary halves are interleaved
    (rows ``[0, dh/2, 1, dh/2 + 1, ...]``). Rows only, so codes and per-row grids permute alike."""
    r = w.shape[0]
    return w.reshape(n_head, 2, r // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    r = w.shape[0]
    return w.reshape(n_head, r // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", None):
        raise GGUFExportError(f"rope scaling '{kind}' is not written to GGUF yet (default RoPE only)")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def check_gguf_exportable(cfg: dict) -> None:
    """Refuse, before any work, a model this writer cannot express."""
    if cfg.get("model_type") not in GGUF_ARCH:
        raise GGUFExportError(f"GGUF export supports the Llama, Qwen2 and Qwen3 architectures (model_type "
                              f"{', '.join(repr(k) for k in GGUF_ARCH)}); this model is '{cfg.get('model_type')}'")
    _rope_theta(cfg)
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):     # (Qwen2's q/k/v biases are its architecture's)
        raise GGUFExportError("GGUF export: attention/MLP biases are not written for this architecture")
    if cfg.get("use_sliding_window"):
        raise GGUFExportError("GGUF export: sliding-window attention is not written")


# llama.cpp's name for a byte-level BPE pre-tokenizer (``tokenizer.ggml.pre``): it splits text with the
# regexes of that name, and a wrong name tokenizes differently from the model's own tokenizer (SmolLM2 as
# "default": 86,430 tokens for WikiText-2 text it encodes in 74,566; benchmarks/llamacpp_check.py --tokenizer)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")   # Qwen2/2.5/3's split: Llama 3's with single digits
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(tok: dict) -> str:
    """``tokenizer.json``'s pre-tokenizer as llama.cpp names it: byte-level with GPT-2's regex ("gpt-2"),
    single digits then GPT-2's regex (SmolLM's original tokenizer: "smollm"), Llama 3's split regex
    ("llama-bpe"), Qwen2's ("qwen2"); anything else is refused (llama.cpp's converter refuses what it does
    not know)."""
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
            and parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space")):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        name = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(parts[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise GGUFExportError(f"GGUF export: the tokenizer's pre-tokenizer ({', '.join(map(str, kinds)) or 'none'}) is not "
                          "one llama.cpp names here (GPT-2 byte level, SmolLM's digits + byte level, Llama 3's or "
                          "Qwen2's split); llama.cpp would tokenize text differently from the model's own tokenizer")


SPM_SPACE = "\u2581"   # SentencePiece's space symbol
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")   # a byte-fallback token


def sentencepiece_options(tok: dict) -> dict | None:
    """SentencePiece-style BPE (Llama 1/2, Mistral, TinyLlama: ``▁`` for spaces, byte fallback), as
    llama.cpp's "llama" vocabulary expresses it: ``{"add_space_prefix": bool}``; None for a byte-level
    tokenizer. A normalizer step llama.cpp does not apply is refused: SentencePiece's
    remove_extra_whitespaces (llama2.c's tokenizers: leading/trailing spaces dropped, runs collapsed) is
    a GGUF key that llama.cpp (llama-cpp-python 0.3.36) ignores for this vocabulary: measured, it then
    tokenizes WikiText-2 into other ids from the first token (``benchmarks/llamacpp_check.py --tokenizer``)."""
    pre = tok.get("pre_tokenizer") or {}
    norm = tok.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else ([norm] if norm else [])
    metaspace = pre.get("type") == "Metaspace"
    if not metaspace and not any(st.get("type") == "Replace" and st.get("content") == SPM_SPACE for st in steps):
        return None
    opts = {"add_space_prefix": False}
    if metaspace:
        if pre.get("replacement", SPM_SPACE) != SPM_SPACE or pre.get("split", True):   # tokenizers' default: split
            raise GGUFExportError("GGUF export: a Metaspace pre-tokenizer that splits words is not llama.cpp's "
                                  "SentencePiece tokenization")
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        opts["add_space_prefix"] = scheme in ("always", "first")
    for st in steps:
        kind, pattern = st.get("type"), st.get("pattern", {})
        if kind == "Prepend" and st.get("prepend") == SPM_SPACE:
            opts["add_space_prefix"] = True
        elif kind == "Replace" and pattern.get("String") == " " and st.get("content") == SPM_SPACE:
            pass
        else:
            raise GGUFExportError(f"GGUF export: the tokenizer's normalizer step {kind} {pattern or ''} is not "
                                  "applied by llama.cpp's SentencePiece tokenizer (e.g. SentencePiece's "
                                  "remove_extra_whitespaces); llama.cpp would tokenize text differently")
    return opts


def check_gguf_tokenizer(model_dir: str | Path) -> str:
    """How llama.cpp will tokenize ``model_dir``'s tokenizer: the pre-tokenizer name of a byte-level BPE
    tokenizer, or "llama" for a SentencePiece-style one; a clear error (before any work) otherwise."""
    tok_file = Path(model_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise GGUFExportError(f"{model_dir}: no tokenizer.json to write into the GGUF")
    tok = json.loads(tok_file.read_text())
    if tok.get("model", {}).get("type") != "BPE":
        raise GGUFExportError(f"GGUF export writes BPE tokenizers (byte level or SentencePiece style); this one is "
                              f"'{tok.get('model', {}).get('type')}'")
    if sentencepiece_options(tok) is not None:
        if not tok["model"].get("byte_fallback"):
            raise GGUFExportError("GGUF export: SentencePiece-style spaces (▁) without byte fallback tokens: not a "
                                  "vocabulary llama.cpp's SentencePiece tokenizer reads as the model does")
        return "llama"
    return pre_tokenizer_name(tok)


def _vocab(tok: dict) -> tuple[dict, dict, int]:
    vocab = dict(tok["model"]["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    return vocab, added, max(vocab.values()) + 1


def sentencepiece_scores(tok: dict) -> list[float]:
    """Token scores for llama.cpp's SentencePiece tokenizer, which merges the adjacent pair whose union
    is the highest-scoring token: ``-rank`` of the first merge that makes the token (transformers' merges
    of a SentencePiece model are ordered by its scores), so llama.cpp merges in the order of the
    tokenizer's own merges; characters, bytes and added tokens score 0 (no merge makes them), a longer
    token no merge makes scores below every merge (llama.cpp could still form it; transformers never)."""
    vocab, added, n = _vocab(tok)
    merges = tok["model"].get("merges", [])
    scores = [0.0] * n
    seen = set()
    for rank, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(a + b)
        if i is not None and i not in seen:
            seen.add(i)
            scores[i] = -float(rank)
    for text, i in vocab.items():
        if i not in seen and len(text) > 1 and text not in added and not _BYTE_TOKEN.fullmatch(text):
            scores[i] = -float(len(merges))
    return scores


def _tokenizer_kv(writer, model_dir: Path) -> None:
    import gguf
    kind = check_gguf_tokenizer(model_dir)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab, added, n = _vocab(tok)
    tokens, types = [f"[PAD{i}]" for i in range(n)], [gguf.TokenType.UNUSED] * n
    spm = kind == "llama"
    unk = tok["model"].get("unk_token")
    cfg_file = model_dir / "tokenizer_config.json"
    if unk is None and cfg_file.is_file():
        unk = json.loads(cfg_file.read_text()).get("unk_token")
        unk = unk.get("content") if isinstance(unk, dict) else unk
    for text, i in vocab.items():
        tokens[i] = text
        t = added.get(text)
        if spm and text == unk:
            types[i] = gguf.TokenType.UNKNOWN
        elif t:
            types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
        elif spm and tok["model"].get("byte_fallback") and _BYTE_TOKEN.fullmatch(text):
            types[i] = gguf.TokenType.BYTE
        else:
            types[i] = gguf.TokenType.NORMAL
    if spm:
        opts = sentencepiece_options(tok)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(sentencepiece_scores(tok))
        writer.add_token_types(types)
        writer.add_add_space_prefix(opts["add_space_prefix"])
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(kind)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=not spm, n_vocab=n).add_to_gguf(writer)


@dataclass
class KQuantTensor:
    """A weight solved on a k-quant grid (``solvers.kquant``): ``codes`` ``(R, C)`` and the stored
    fields of :attr:`QuantResult.kquant` (``sc``, ``m``, ``d``, ``dmin`` per row), written as GGUF blocks."""
    codes: torch.Tensor
    fields: dict

    def permute_rows(self, n_head: int) -> "KQuantTensor":
        f = {k: (v if v is None or k == "type" else permute_rows(v, n_head)) for k, v in self.fields.items()}
        return KQuantTensor(permute_rows(self.codes, n_head), f)

    def blocks(self) -> tuple[np.ndarray, "object"]:
        import gguf
        from ..solvers.kquant import ktype
        from .gguf_quants import pack_superblocks
        f = self.fields
        R, C = self.codes.shape
        block = ktype(f["type"]).block
        nb = R * C // block
        flat = lambda t: None if t is None else t.reshape(nb, -1)  # noqa: E731
        raw = pack_superblocks(self.codes.reshape(nb, block), flat(f.get("sc")), flat(f.get("m")),
                               f["d"].reshape(nb), None if f.get("dmin") is None else f["dmin"].reshape(nb), f["type"])
        return raw.reshape(R, -1), getattr(gguf.GGMLQuantizationType, f["type"].upper())


@dataclass
class RawGGUFTensor:
    """A weight already in GGUF blocks (``raw``: ``uint8`` ``(rows, bytes per row)``, rows in the
    Hugging Face order: each row is quantized on its own, so q/k rows are permuted as whole rows),
    e.g. from llama.cpp's own quantizer; ``qtype`` a ``gguf.GGMLQuantizationType`` name (``"Q4_0"``)."""
    raw: np.ndarray
    qtype: str


def write_llama_gguf(model_dir: str | Path, out_path: str | Path, tensors, float_type: str = "f16",
                     file_type: str | None = None) -> Path:
    """Write ``tensors`` (``(hf_name, torch.Tensor, KQuantTensor or RawGGUFTensor)`` pairs, e.g. a checkpoint's) of the
    Llama / Qwen2 / Qwen3 model in ``model_dir`` (config and tokenizer) as a GGUF file; ``float_type`` f16, bf16 or f32 for
    the float matrices, k-quant types for :class:`KQuantTensor` weights; ``file_type`` the ``--kquant``
    choice for ``general.file_type`` (default: the float type's)."""
    import gguf
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    check_gguf_exportable(cfg)
    if float_type not in ("f16", "bf16", "f32"):
        raise GGUFExportError(f"float_type must be f16, bf16 or f32, got {float_type!r}")
    n_head, n_kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    d = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or d // n_head)
    tmp = out_path.with_name(out_path.name + ".partial")
    arch = GGUF_ARCH[cfg["model_type"]]
    w = gguf.GGUFWriter(str(tmp), arch=arch)
    w.add_name(model_dir.name)
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(d)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(int(cfg["vocab_size"]))
    from ..solvers.kquant import GGUF_FILE_TYPE
    w.add_file_type(getattr(gguf.LlamaFileType, GGUF_FILE_TYPE[file_type]) if file_type in GGUF_FILE_TYPE else
                    {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "f32": gguf.LlamaFileType.ALL_F32}[float_type])
    _tokenizer_kv(w, model_dir)
    tied = bool(cfg.get("tie_word_embeddings"))
    for name, t in tensors:
        if name == "lm_head.weight" and tied:
            continue
        heads = None if arch != "llama" else \
            n_head if name.endswith("q_proj.weight") else n_kv if name.endswith("k_proj.weight") else None
        if isinstance(t, KQuantTensor):
            raw, qtype = (t.permute_rows(heads) if heads else t).blocks()
            w.add_tensor(gguf_name(name), raw, raw_dtype=qtype)
            continue
        if isinstance(t, RawGGUFTensor):
            raw = t.raw if not heads else permute_rows(torch.from_numpy(np.ascontiguousarray(t.raw)), heads).numpy()
            w.add_tensor(gguf_name(name), np.ascontiguousarray(raw), raw_dtype=getattr(gguf.GGMLQuantizationType,
                                                                                          t.qtype.upper()))
            continue
        t = t.detach().float()
        if heads:
            t = permute_rows(t, heads)
        if t.dim() > 1 and float_type == "bf16":   # raw bytes: numpy has no bfloat16
            raw = t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
            w.add_tensor(gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
            continue
        arr = t.numpy()
        if t.dim() > 1 and float_type == "f16":
            arr = arr.astype(np.float16)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out_path)
    return out_path


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A GGUF file -> a Hugging Face directory (weights dequantized by transformers' GGUF loader,
    tokenizer and config from the file's metadata)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    fields = gguf.GGUFReader(gguf_path).fields
    arch = fields["general.architecture"].contents()
    if f"{arch}.attention.key_length" in fields:   # transformers' loader does not read it (Qwen3's head_dim)
        config.head_dim = int(fields[f"{arch}.attention.key_length"].contents())
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype,
                                                 config=config)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    clean = type(model)(type(model.config).from_dict(cfg))
    clean.load_state_dict(model.state_dict(), strict=True)
    clean.to(dtype).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out_dir)
    return out_dir
