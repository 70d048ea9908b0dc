"""Export a finished run (``run_quant.py --output DIR``) to real low-bit checkpoint formats.

* ``packed``: lowmem_boa's own format (:mod:`.packed`), exact, loadable with ``load_packed_model``
  and evaluable by ``run_eval.py``;
* ``gptq``: the GPTQ checkpoint layout (``qweight``/``qzeros``/``scales``/``g_idx`` +
  ``quantization_config``) read by GPTQModel/AutoGPTQ, vLLM and SGLang; ``checkpoint_format="gptq"``
  (v1: stored zero-points are ``zero - 1``) or ``"gptq_v2"`` (stored as is). GPTQModel loads v2 at
  every grid and v1 only when symmetric: it refuses an asymmetric v1 checkpoint that GPTQModel did not
  produce itself (``benchmarks/gptqmodel_check.py`` measures both);
* ``compressed-tensors``: the ``pack-quantized`` format of compressed-tensors (transformers loads it,
  vLLM serves it).

Everything is read from the run's block files (integer codes, scales, zeros) and its exported
checkpoint (the other tensors, written in the source model's precision where it is float16 or
bfloat16, as the source had them), one block at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint.export_hf import write_checkpoint
from ..checkpoint.state import RunState
from ..models import get_adapter
from ..scheduler import CheckpointReader, load_config
from .packed import FORMAT as PACKED_FORMAT
from .packed import QUANT_METHOD, mark_config, pack_layer
from .packing import pack_int32_cols, pack_int32_rows

FORMATS = ("packed", "gptq", "compressed-tensors", "gguf")
EXPORT_CHOICES = ("packed", "gptq", "gptq_v2", "compressed-tensors", "gguf")   # what --export accepts


class ExportError(ValueError):
    pass


def _run_info(run_dir: Path) -> dict:
    report = run_dir / "quant_report.json"
    if not report.is_file():
        raise ExportError(f"{run_dir} is not a finished lowmem_boa run (no quant_report.json)")
    return json.loads(report.read_text())


def _layers(run_dir: Path, config, adapter, state_dir: str | None = None):
    """``(full_name, kind, tensors)`` per block parameter: kind 'quant' (codes/scale/zero/bias) or 'plain'."""
    state = RunState(run_dir, state_dir)
    quantized = set(adapter.linear_names())
    for i in range(adapter.n_blocks):
        tensors, meta = state.load_block(i, codes=True)
        prefix = adapter.block_name(i)
        done = set()
        for name in meta["layers"]:
            quantized_layer = {"codes": tensors[f"{name}.qcodes"], "scale": tensors[f"{name}.qscale"],
                               "zero": tensors[f"{name}.qzero"], "bias": tensors.get(f"{name}.bias"),
                               **{f"kq_{k}": tensors[f"{name}.kq_{k}"] for k in ("sc", "m", "d", "dmin")
                                  if f"{name}.kq_{k}" in tensors},
                               **({"kq_type": meta["kquant_types"][name]} if name in meta.get("kquant_types", {})
                                  else {})}
            done |= {f"{name}.{k}" for k in ("qcodes", "qscale", "qzero", "weight", "bias", "kq_sc", "kq_m", "kq_d",
                                             "kq_dmin")}
            yield f"{prefix}.{name}", "quant", quantized_layer
        assert set(meta["layers"]) == quantized
        for k, v in tensors.items():
            if k not in done:
                yield f"{prefix}.{k}", "plain", v


def _float_dtype(run_dir: Path, info: dict) -> str:
    """The precision of an export's unquantized tensors (embeddings, norms, head, biases): the source
    model's where it is float16 / bfloat16 (a CPU run computes and writes its checkpoint in float32, and
    the source values convert back exactly), else the run's."""
    src = info.get("source_model_dir")
    for d in ([Path(src)] if src else []) + [run_dir]:
        if (d / "config.json").is_file():
            cfg = json.loads((d / "config.json").read_text())
            name = cfg.get("dtype") or cfg.get("torch_dtype")
            if name in ("float16", "bfloat16") or d == run_dir:
                return name or "float32"
    return "float32"


def _non_block_tensors(run_dir: Path, adapter, source_dir: str | None = None, dtype: str | None = None):
    """Embeddings, final norm and head: from the run's fake-quantized checkpoint, or (``--no-fake-quant``)
    from the source model, converted to ``dtype`` (default: the run dtype)."""
    has_weights = (run_dir / "model.safetensors").is_file() or (run_dir / "model.safetensors.index.json").is_file()
    if not has_weights and source_dir is None:
        raise ExportError(f"{run_dir} holds no weights and its report names no source model")
    reader = CheckpointReader(run_dir if has_weights else source_dir)
    dtype = getattr(torch, dtype or json.loads((run_dir / "config.json").read_text()).get("dtype") or "float32")
    prefix = adapter.blocks_prefix + "."
    for key in sorted(reader.keys()):
        if not key.startswith(prefix):
            t = reader.get(key)
            yield key, t.to(dtype) if t.is_floating_point() else t


def export_run(run_dir: str | Path, fmt: str, out_dir: str | Path, checkpoint_format: str = "gptq") -> list[str]:
    """Write ``run_dir`` in ``fmt`` to ``out_dir``; returns the files written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; choose from {', '.join(FORMATS)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = _run_info(run_dir)
    qc = info["config"]
    if fmt == "gguf" or qc.get("kquant"):
        if fmt != "gguf" or not qc.get("kquant"):
            raise ExportError("gguf exports need a --kquant run, and --kquant runs export only to gguf")
        return [str(export_gguf(run_dir, out_dir, info))]
    bits, gs, sym = qc["wbits"], qc["group_size"], qc["sym"]
    config = load_config(str(run_dir))
    adapter = get_adapter(config)
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["dtype"] = _float_dtype(run_dir, info)
    cfg.pop("torch_dtype", None)
    fdt = getattr(torch, cfg["dtype"])
    modules = {}

    def tensors():
        yield from _non_block_tensors(run_dir, adapter, info.get("source_model_dir"), cfg["dtype"])
        for name, kind, t in _layers(run_dir, config, adapter, info.get("state_dir")):
            if kind == "plain":
                yield name, t.to(fdt) if t.is_floating_point() else t
                continue
            codes, scale, zero, bias = t["codes"], t["scale"], t["zero"], t["bias"]
            modules[name] = list(codes.shape)
            if fmt == "packed":
                for k, v in pack_layer(codes, scale, zero, bits).items():
                    yield f"{name}.{k}", v
            elif fmt == "gptq":
                yield from _gptq_layer(name, codes, scale, zero, bits, gs, checkpoint_format)
            else:
                yield from _ct_layer(name, codes, scale, zero, bits, sym)
            if bias is not None:
                yield f"{name}.bias", bias.to(fdt)

    # the quantization_config names the modules, known only after streaming: write tensors first
    files = write_checkpoint(out_dir, run_dir, cfg, tensors())
    if fmt == "packed":
        qcfg = {"quant_method": QUANT_METHOD, "format": PACKED_FORMAT, "bits": bits, "group_size": gs, "sym": sym,
                "method": qc["method"], "modules": modules}
        cfg = mark_config(cfg)
    elif fmt == "gptq":
        # "format" is GPTQModel's key, "checkpoint_format" the legacy one vLLM and SGLang read: both
        qcfg = {"quant_method": "gptq", "bits": bits, "group_size": gs or -1, "desc_act": False, "sym": sym,
                "true_sequential": bool(qc.get("true_sequential", True)), "checkpoint_format": checkpoint_format,
                "format": checkpoint_format, "pack_dtype": "int32",
                "meta": {"quantizer": [f"lowmem_boa:{qc['method']}"]}}
    else:
        qcfg = _ct_config(bits, gs, sym, adapter)
    cfg["quantization_config"] = qcfg
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return files


def export_gguf(run_dir: Path, out_dir: Path, info: dict) -> Path:
    """``OUT/model.gguf``: every quantized linear as its k-quant blocks, the token embedding and output
    head in their ``--kquant-embedding`` type (rounded from the source weight, as the run's checkpoint
    holds them), the other tensors in the source model's precision (float16: F16, bfloat16: BF16, else
    F32; lossless either way, as llama.cpp's converter writes them), with the source model's tokenizer
    and hyper-parameters."""
    from ..solvers.kquant import embedding_type, quantize_tensor
    from .gguf_file import KQuantTensor, write_llama_gguf
    config = load_config(str(run_dir))
    adapter = get_adapter(config)
    float_type = {"float16": "f16", "bfloat16": "bf16"}.get(_float_dtype(run_dir, info), "f32")
    emb = embedding_type(info["config"].get("kquant_embedding"), adapter.heads.hidden_size)
    source = info.get("source_model_dir")
    if emb and not (source and (Path(source) / "config.json").is_file()):
        raise ExportError(f"the GGUF embedding ({emb}) is rounded from the source model's weight, and the run's "
                          f"source model ({source}) is not there")
    src = CheckpointReader(source) if emb else None

    def tensors():
        for name, t in _non_block_tensors(run_dir, adapter, source):
            if emb and name in ("model.embed_tokens.weight", "lm_head.weight"):   # as the checkpoint holds it
                codes, fields, _ = quantize_tensor(src.get(src.resolve(name)), emb)
                yield name, KQuantTensor(codes, fields)
            else:
                yield name, t
        for name, kind_, t in _layers(run_dir, config, adapter, info.get("state_dir")):
            if kind_ == "plain":
                yield name, t
            else:
                fields = {k: t.get(f"kq_{k}") for k in ("sc", "m", "d", "dmin")}
                yield f"{name}.weight", KQuantTensor(t["codes"], {"type": t["kq_type"], **fields})
                if t.get("bias") is not None:     # Qwen2's q/k/v biases: as the checkpoint holds them
                    yield f"{name}.bias", t["bias"]

    out_dir.mkdir(parents=True, exist_ok=True)
    return write_llama_gguf(run_dir, out_dir / "model.gguf", tensors(), float_type=float_type,
                            file_type=info["config"].get("kquant"))


def _gptq_layer(name, codes, scale, zero, bits, gs, checkpoint_format):
    """GPTQ tensors of one linear: qweight (in*b/32, out), qzeros (G, out*b/32), scales (G, out) fp16, g_idx."""
    out_f, in_f = codes.shape
    stored_zero = zero.round().to(torch.int64)
    if checkpoint_format == "gptq":
        if int(stored_zero.min()) < 1:
            raise ExportError(f"{name}: a zero-point of 0 cannot be stored in GPTQ's v1 format "
                              "(stored as zero - 1); export with checkpoint_format='gptq_v2' or compressed-tensors")
        stored_zero = stored_zero - 1
    elif checkpoint_format != "gptq_v2":
        raise ExportError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    yield f"{name}.qweight", pack_int32_rows(codes.T.contiguous().to(torch.int32), bits)
    yield f"{name}.qzeros", pack_int32_cols(stored_zero.T.contiguous(), bits)
    yield f"{name}.scales", scale.T.contiguous().to(torch.float16)
    yield f"{name}.g_idx", (torch.arange(in_f, dtype=torch.int32) // (gs or in_f)).to(torch.int32)


def _ct_layer(name, codes, scale, zero, bits, sym):
    """compressed-tensors pack-quantized: unsigned codes are its signed values + 2**(bits-1)."""
    out_f, in_f = codes.shape
    yield f"{name}.weight_packed", pack_int32_cols(codes.to(torch.int32), bits)
    yield f"{name}.weight_scale", scale.float().contiguous()
    yield f"{name}.weight_shape", torch.tensor([out_f, in_f], dtype=torch.int64)
    if not sym:
        yield f"{name}.weight_zero_point", pack_int32_rows(zero.round().to(torch.int32), bits)


def _ct_config(bits, gs, sym, adapter) -> dict:
    targets = sorted({n.rsplit(".", 1)[-1] for n in adapter.linear_names()})
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": [f"re:.*\\.{t}$" for t in targets],
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym,
                        "strategy": "group" if gs else "channel", "group_size": gs, "dynamic": False,
                        "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized"}},
        "ignore": ["lm_head"], "kv_cache_scheme": None,
    }


def export_choice(run_dir: str | Path, choice: str) -> list[str]:
    """``--export`` choice -> ``RUN_DIR/<choice>/`` (``gptq``: v1 zero-points, ``gptq_v2``: as stored)."""
    fmt, ckpt = ("gptq", choice) if choice in ("gptq", "gptq_v2") else (choice, "gptq")
    return export_run(run_dir, fmt, Path(run_dir) / choice, checkpoint_format=ckpt)
