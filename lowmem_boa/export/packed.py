"""lowmem_boa's packed low-bit checkpoint: integer codes bit-packed, grids alongside, safetensors only.

Layout: ``config.json`` has ``model_type = "lowmem_boa_packed"`` (the original one is kept in
``packed_model_type``) and ``quantization_config = {"quant_method": "lowmem_boa", ...}``, so a plain
``from_pretrained`` refuses the directory instead of loading it with randomly initialised linears
(transformers skips unknown quantization methods with a warning). For every quantized linear
``name``:

* ``name.qweight`` ``uint8 (out, ceil(in * bits / 8))``: codes, a little-endian bit stream per row;
* ``name.scales`` ``float32 (out, n_groups)`` and ``name.qzeros`` ``uint8 (out, ceil(n_groups * bits / 8))``;
* ``name.bias`` as in the original.

De-quantization ``scales * (codes - zeros)`` in float32, cast to the model dtype, is exactly the
arithmetic of the solvers, so the rebuilt weights equal the fake-quantized ones bit for bit.
File size: ``bits/16`` of an fp16 model for the quantized linears, plus 4 bytes (scale) and
``bits/8`` bytes (zero) per group.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..solvers.grid import dequantize
from .packing import pack_bits, unpack_bits

QUANT_METHOD = "lowmem_boa"
FORMAT = "packed-bits/1"
MODEL_TYPE = "lowmem_boa_packed"


def mark_config(cfg: dict) -> dict:
    """The config.json of a packed checkpoint (made unloadable by plain transformers)."""
    cfg = dict(cfg)
    cfg["packed_model_type"] = cfg["model_type"]
    cfg["model_type"] = MODEL_TYPE
    return cfg


def original_config(raw: dict) -> dict:
    """The model's own config from a packed checkpoint's config.json (quantization config removed)."""
    raw = dict(raw)
    raw["model_type"] = raw.pop("packed_model_type")
    raw.pop("quantization_config", None)
    return raw


def pack_layer(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> dict:
    return {"qweight": pack_bits(codes, bits), "scales": scale.float().contiguous(),
            "qzeros": pack_bits(zero.round().to(torch.uint8), bits)}


def unpack_layer(t: dict, bits: int, in_features: int, group_size: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The de-quantized weight of one packed linear, in ``dtype``."""
    scales = t["scales"]
    codes = unpack_bits(t["qweight"], bits, in_features)
    zeros = unpack_bits(t["qzeros"], bits, scales.shape[1]).to(scales.dtype)
    return dequantize(codes, scales, zeros, group_size, dtype=dtype)


class QuantLinear(nn.Module):
    """A linear layer stored as packed codes; the weight is rebuilt on every forward."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        n_groups = 1 if group_size is None else -(-in_features // group_size)
        self.register_buffer("qweight", torch.empty(out_features, -(-in_features * bits // 8), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=torch.float32, device=device))
        self.register_buffer("qzeros", torch.empty(out_features, -(-n_groups * bits // 8), dtype=torch.uint8,
                                                   device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def weight_dequantized(self) -> torch.Tensor:
        return unpack_layer({"qweight": self.qweight, "scales": self.scales, "qzeros": self.qzeros}, self.bits,
                            self.in_features, self.group_size, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_dequantized().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def read_quant_config(model_dir: Path) -> dict | None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    q = cfg.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def load_packed_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A transformers model whose quantized linears are :class:`QuantLinear` (packed in memory)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    model_dir = Path(model_dir)
    q = read_quant_config(model_dir)
    if q is None:
        raise ValueError(f"{model_dir} is not a lowmem_boa packed checkpoint (no quantization_config "
                         f"with quant_method '{QUANT_METHOD}')")
    raw = original_config(json.loads((model_dir / "config.json").read_text()))
    config = AutoConfig.for_model(**raw)
    dtype = dtype or getattr(torch, str(raw.get("dtype") or "float32"))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, (out_f, in_f) in q["modules"].items():
        parent, child = name.rsplit(".", 1)
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), child,
                QuantLinear(in_f, out_f, q["bits"], q["group_size"], old.bias is not None, dtype=dtype, device="meta"))
    state = {}
    for f in _weight_files(model_dir):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    return model.to(device).eval()


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [model_dir / "model.safetensors"]
