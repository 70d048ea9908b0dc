"""Packed, GPTQ and compressed-tensors exports of a finished run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lowmem_boa.checkpoint import RunState
from lowmem_boa.config import QuantConfig, RunOptions
from lowmem_boa.export.formats import ExportError, export_run
from lowmem_boa.export.packed import load_packed_model
from lowmem_boa.pipeline import quantize_model
from lowmem_boa.ui import Console

from test_packing import _gptq_unpack_reference
from tiny_models import SHARED, needs_shared, save_tiny_model

pytestmark = needs_shared


# the last case: refined scales (and grids that follow the weights, static groups, alpha-scaled fp targets)
TURBO = dict(fp_targets=True, fp_alpha=0.25, follow_grids=True, refine_scales=2, act_order_col=True)


@pytest.fixture(scope="module", params=[(2, None, False, {}), (3, 32, False, {}), (4, 16, True, {}), (8, None, True, {}),
                                        (2, 32, False, TURBO)],
                ids=["w2", "w3g32", "w4g16sym", "w8sym", "w2g32-refined"])
def run(request, tmp_path_factory):
    bits, gs, sym, extra = request.param
    root = tmp_path_factory.mktemp("export")
    model = save_tiny_model("llama", root / "m", seed=7, n_layers=2)
    qc = QuantConfig(model=str(model), method="boa", wbits=bits, group_size=gs, sym=sym, nsamples=4, seqlen=32,
                     **extra)
    ro = RunOptions(output=str(root / "q"), device="cpu", data_dir=str(SHARED / "data"), progress=False)
    quantize_model(qc, ro, Console(progress=False))
    return root / "q", bits, gs, sym


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_packed_round_trip_is_exact_and_small(run, tmp_path):
    from transformers import AutoModelForCausalLM
    qdir, bits, gs, sym = run
    files = export_run(qdir, "packed", tmp_path / "p")
    assert "model.safetensors" in files
    fake = AutoModelForCausalLM.from_pretrained(qdir).eval()
    packed = load_packed_model(tmp_path / "p")
    for name, mod in packed.named_modules():
        if type(mod).__name__ == "QuantLinear":
            assert torch.equal(mod.weight_dequantized(), fake.get_submodule(name).weight), name
    ids = torch.randint(2, 8000, (2, 20))
    assert torch.equal(_logits(packed, ids), _logits(fake, ids))
    # size: quantized linears take bits/32 of their float32 bytes plus grids
    st = load_file(tmp_path / "p" / "model.safetensors")
    q = [k for k in st if k.endswith(".qweight")]
    dense = sum(fake.get_submodule(k[:-len(".qweight")]).weight.numel() for k in q)
    packed_bytes = sum(st[k].numel() for k in q)
    assert packed_bytes == pytest.approx(dense * bits / 8, rel=0.02)
    # a plain from_pretrained refuses the packed checkpoint rather than loading random weights
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(tmp_path / "p")


def test_gptq_layout_unpacks_to_our_codes(run, tmp_path):
    qdir, bits, gs, sym = run
    try:
        export_run(qdir, "gptq", tmp_path / "g", checkpoint_format="gptq")
        fmt = "gptq"
    except ExportError as e:              # a zero-point of 0 is not representable in v1
        assert "gptq_v2" in str(e)
        export_run(qdir, "gptq", tmp_path / "g", checkpoint_format="gptq_v2")
        fmt = "gptq_v2"
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["group_size"] == (gs or -1)
    assert cfg["checkpoint_format"] == cfg["format"] == fmt and cfg["pack_dtype"] == "int32"
    st = load_file(tmp_path / "g" / "model.safetensors")
    blk = RunState(qdir).load_block(1, codes=True)[0]
    name = "self_attn.o_proj"
    full = f"model.layers.1.{name}"
    codes = _gptq_unpack_reference(st[f"{full}.qweight"], bits).T
    assert torch.equal(codes.to(torch.uint8), blk[f"{name}.qcodes"])
    G = st[f"{full}.scales"].shape[0]
    zeros = _gptq_unpack_reference(st[f"{full}.qzeros"].T.contiguous(), bits).T[:G]
    expect = blk[f"{name}.qzero"].T.to(torch.int64) - (1 if fmt == "gptq" else 0)
    assert torch.equal(zeros.to(torch.int64), expect)
    assert torch.equal(st[f"{full}.scales"], blk[f"{name}.qscale"].T.to(torch.float16))
    in_f = codes.shape[1]
    assert torch.equal(st[f"{full}.g_idx"], (torch.arange(in_f) // (gs or in_f)).to(torch.int32))
    # de-quantizing GPTQ-style (fp16 scales) reproduces our weights to fp16 rounding of the scales
    g_idx = st[f"{full}.g_idx"].long()
    W = (codes.double() - (zeros.double() + (1 if fmt == "gptq" else 0))[g_idx].T) \
        * st[f"{full}.scales"].double()[g_idx].T
    assert torch.allclose(W.float(), blk[f"{name}.weight"], rtol=2e-3, atol=1e-6)


def test_compressed_tensors_loads_with_the_real_library_and_matches(run, tmp_path):
    """transformers + compressed-tensors load the export and give our logits. Asymmetric
    pack-quantized checkpoints (even those compressed-tensors writes itself) do not load through
    transformers 5.23's default compressed path with compressed-tensors 0.20 (packed zero-points vs
    the unpacked layout it builds on meta); they load with ``dequantize=True``."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    qdir, bits, gs, sym = run
    export_run(qdir, "compressed-tensors", tmp_path / "ct")
    fake = AutoModelForCausalLM.from_pretrained(qdir).eval()
    kwargs = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", **kwargs).eval()
    ids = torch.randint(2, 8000, (2, 20))
    a, b = _logits(fake, ids), _logits(ct, ids)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())


def test_compressed_tensors_tensors_equal_the_librarys_own_compression(run, tmp_path):
    """Given our quantized weights and grids, compressed-tensors' own compressor writes exactly
    the tensors of our export."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from transformers import AutoModelForCausalLM
    qdir, bits, gs, sym = run
    export_run(qdir, "compressed-tensors", tmp_path / "ct")
    ours = load_file(tmp_path / "ct" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(qdir).eval()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if gs else "channel",
                            group_size=gs)
    qcfg = QuantizationConfig(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
                              ignore=["lm_head"], format="pack-quantized")
    apply_quantization_config(model, qcfg)
    for i in range(2):
        blk = RunState(qdir).load_block(i, codes=True)[0]
        for name in [k[:-len(".qcodes")] for k in blk if k.endswith(".qcodes")]:
            mod = model.get_submodule(f"model.layers.{i}.{name}")
            mod.weight_scale.data.copy_(blk[f"{name}.qscale"].to(mod.weight_scale.dtype))
            if not sym:
                mod.weight_zero_point.data.copy_((blk[f"{name}.qzero"] - 2 ** (bits - 1)).to(mod.weight_zero_point.dtype))
    comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    comp.compress_model(model)
    theirs = model.state_dict()
    keys = [k for k in ours if k.endswith(("weight_packed", "weight_zero_point", "weight_shape"))]
    assert keys and sym == (not any(k.endswith("weight_zero_point") for k in keys))  # symmetric: no zero-points
    for k in keys:
        assert torch.equal(ours[k], theirs[k].to(ours[k].dtype)), k
    for k in [k for k in ours if k.endswith("weight_scale")]:
        assert torch.equal(ours[k], theirs[k].float()), k


def test_export_refuses_what_is_not_a_finished_run(tmp_path):
    with pytest.raises(ExportError, match="not a finished lowmem_boa run"):
        export_run(tmp_path, "packed", tmp_path / "x")
    with pytest.raises(ExportError, match="unknown export format"):
        export_run(tmp_path, "onnx", tmp_path / "x")


def test_run_quant_export_option_writes_loadable_checkpoints(tmp_path):
    import subprocess
    import sys

    from tiny_models import REPO
    model = save_tiny_model("opt", tmp_path / "m", seed=2, n_layers=2)
    out = tmp_path / "q"
    args = [sys.executable, str(REPO / "run_quant.py"), "--model", str(model), "--output", str(out), "--method", "gptq",
            "--wbits", "4", "--sym", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--no-progress",
            "--data-dir", str(SHARED / "data"), "--export", "packed,gptq,compressed-tensors"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM
    fake = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(2, 8000, (1, 12))
    assert torch.equal(_logits(load_packed_model(out / "packed"), ids), _logits(fake, ids))
    ct = AutoModelForCausalLM.from_pretrained(out / "compressed-tensors").eval()
    assert torch.allclose(_logits(ct, ids), _logits(fake, ids), atol=1e-4, rtol=1e-4)
    assert json.loads((out / "gptq" / "config.json").read_text())["quantization_config"]["sym"] is True
    r = subprocess.run(args[:-1] + ["onnx"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 2 and "unknown format" in r.stderr


def test_a_float16_source_exports_its_unquantized_tensors_in_float16(tmp_path):
    """A CPU run computes (and writes its fake-quantized checkpoint) in float32; the exports keep the
    source model's float16 for what they do not quantize (embeddings, norms), exactly the source values."""
    from transformers import AutoModelForCausalLM
    model = save_tiny_model("llama", tmp_path / "m", seed=5, n_layers=1)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float16)
    m.save_pretrained(model)
    src = load_file(model / "model.safetensors")
    qc = QuantConfig(model=str(model), method="gptq", wbits=4, nsamples=2, seqlen=32)
    ro = RunOptions(output=str(tmp_path / "q"), device="cpu", data_dir=str(SHARED / "data"), progress=False)
    quantize_model(qc, ro, Console(progress=False))
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == "float32"
    for fmt in ("gptq", "packed"):
        export_run(tmp_path / "q", fmt, tmp_path / fmt)
        assert json.loads((tmp_path / fmt / "config.json").read_text())["dtype"] == "float16"
        st = load_file(tmp_path / fmt / "model.safetensors")
        for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
            assert st[k].dtype == torch.float16 and torch.equal(st[k], src[k]), (fmt, k)
