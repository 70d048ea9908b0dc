"""llama.cpp k-quant grids as solver grids (``solvers.kquant``) and GPTQ onto them: the GGUF bytes we
pack dequantize (with the ``gguf`` package, llama.cpp's reference in Python) to exactly the weights
the solver produced, the stored fields stay in the format's ranges, and the error compensation
helps against rounding onto the same grids."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lowmem_boa.export.gguf_quants import pack_superblocks
from lowmem_boa.solvers import gptq_quantize
from lowmem_boa.solvers import optq as optq_mod
from lowmem_boa.solvers.kquant import K_TYPES, KTYPES, dequantize, quantize, superblock_grid

TYPES = list(KTYPES)          # the k-quants (blocks of 256) and the 32-column types they fall back to


def _weights(R=7, seed=0, C=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, generator=g) * 0.02
    x[1, :16] = 0                       # a zero sub-block
    x[2] = x[2].abs()                   # all positive: no minimum needed
    x[3] = -x[3].abs()                  # all negative
    x[4] = 0                            # a zero super-block
    x[5, 7] = 0.5                       # one outlier
    return x


def _file_weights(codes, k, kt_name, shape):
    block = KTYPES[kt_name].block
    nb = codes.numel() // block
    flat = lambda t: None if t is None else t.reshape(nb, -1)  # noqa: E731
    b = pack_superblocks(codes.reshape(nb, block), flat(k["sc"]), flat(k["m"]), k["d"].reshape(nb),
                         None if k["dmin"] is None else k["dmin"].reshape(nb), kt_name)
    qt = getattr(gguf.GGMLQuantizationType, kt_name.upper())
    assert b.shape[1] == gguf.GGML_QUANT_SIZES[qt][1]
    return torch.from_numpy(gguf.quants.dequantize(b.reshape(-1), qt).reshape(shape))


@pytest.mark.parametrize("name", TYPES)
def test_superblock_grid_packs_to_exactly_our_weights(name):
    kt = KTYPES[name]
    x = _weights(C=kt.block)
    g = superblock_grid(x, kt)
    codes = quantize(x, g.scale, g.zero, kt)
    w = dequantize(codes, g.scale, g.zero, kt)
    assert torch.isfinite(w).all()
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2 ** kt.bits - 1
    k = {"sc": g.sc, "m": g.m, "d": g.d, "dmin": g.dmin}
    assert torch.equal(_file_weights(codes, k, name, x.shape), w)
    if kt.legacy:
        assert g.sc is None and g.m is None and bool((g.d != 0).all())
    elif kt.offset:
        assert int(g.sc.min()) >= 1 and int(g.sc.max()) <= kt.sc_max
        assert int(g.m.min()) >= 0 and int(g.m.max()) <= kt.sc_max
    else:
        assert int(g.sc.min()) >= -kt.sc_max - 1 and int(g.sc.max()) <= kt.sc_max and bool((g.sc != 0).all())
    assert torch.equal(w[4], torch.zeros(kt.block))              # zeros stay zeros
    rel = float(((w - x) ** 2).sum() / (x ** 2).sum())
    assert rel < {2: 0.35, 3: 0.12, 4: 0.03, 5: 0.01, 6: 0.003, 8: 0.001}[kt.bits], rel


def _problem(C=512, R=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(C, 3 * C, generator=g) * torch.linspace(0.2, 2, C)[:, None]
    X[: C // 2] += 0.5 * X[C // 2:]                               # correlated columns
    return torch.randn(R, C, generator=g) * 0.05, X @ X.T / X.shape[1]


def _loss(W, Q, H):
    D = (Q - W).double()
    return float(torch.einsum("rc,cd,rd->", D, H.double(), D))


@pytest.mark.parametrize("name", TYPES)
def test_gptq_on_a_kquant_grid_writes_its_own_weights_and_beats_rounding(name):
    W, H = _problem()
    res = gptq_quantize(W, H, 0, kquant=name)
    assert torch.equal(_file_weights(res.codes, res.kquant, name, W.shape), res.Q)
    assert torch.equal(res.dequantize(), res.Q)
    # rounding onto the grid with the same importance (no compensation): GPTQ on diag(H)
    rtn = gptq_quantize(W, torch.diag(torch.diagonal(H)), 0, kquant=name)
    assert _loss(W, res.Q, H) < _loss(W, rtn.Q, H)


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k"])
def test_identity_hessian_is_plain_rounding_onto_the_grid_of_the_weights(name):
    """With H = I nothing is compensated: every super-block's grid is searched on the untouched
    weights and the result is exactly rounding onto it."""
    kt = KTYPES[name]
    W, _ = _problem(seed=3)
    res = gptq_quantize(W, torch.eye(W.shape[1]), 0, kquant=name, percdamp=0.0)
    for b in range(W.shape[1] // 256):
        x = W[:, 256 * b:256 * (b + 1)]
        g = superblock_grid(x, kt, torch.ones(256))
        assert torch.equal(res.Q[:, 256 * b:256 * (b + 1)], dequantize(quantize(x, g.scale, g.zero, kt), g.scale,
                                                                       g.zero, kt))


@pytest.mark.parametrize("name", ["q2_k", "q6_k"])
def test_numpy_and_torch_sweeps_agree_on_offset_and_zero_point_grids(name, monkeypatch):
    W, H = _problem(seed=4)
    a = gptq_quantize(W, H, 0, kquant=name)
    monkeypatch.setattr(optq_mod, "DEFAULT_BACKEND", "torch")
    b = gptq_quantize(W, H, 0, kquant=name)
    assert torch.equal(a.Q, b.Q) and torch.equal(a.codes, b.codes)


def test_kquant_refuses_what_it_cannot_do():
    W, H = _problem(C=512)
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq_quantize(W[:, :320], H[:320, :320], 0, kquant="q4_k")
    with pytest.raises(ValueError, match="act-order"):
        gptq_quantize(W, H, 0, kquant="q4_k", act_order=True)
    with pytest.raises(ValueError, match="unknown k-quant type"):
        gptq_quantize(W, H, 0, kquant="q7_k")
    assert np.isfinite(gptq_quantize(torch.zeros(2, 256), torch.eye(256), 0, kquant="q2_k").Q.numpy()).all()


def test_kquant_type_overrides_and_their_refusals():
    """``--kquant-type LAYER=TYPE``: the layer's type over ``--kquant`` (a k-quant still falls back to its
    32-column type where the inputs are not a multiple of 256); bad values refused by the CLI's parser
    and the config's validation, before any work (the unknown-layer refusal needs the model: test_gguf)."""
    from lowmem_boa.cli.quant import parse
    from lowmem_boa.solvers.kquant import layer_type
    over = {"mlp.down_proj": "q3_k", "self_attn.v_proj": "q8_0"}
    assert layer_type("q2_k", 1536, "mlp.down_proj", over) == "q3_k"
    assert layer_type("q2_k", 576, "mlp.down_proj", over) == "q4_0"     # q3_k's fallback
    assert layer_type("q2_k", 576, "self_attn.v_proj", over) == "q8_0"
    assert layer_type("q2_k", 576, "self_attn.q_proj", over) == "q4_0"
    assert layer_type("q2_k", 512, "self_attn.q_proj", over) == "q2_k"
    assert layer_type("q4_k", 520, "mlp.up_proj", {"mlp.up_proj": "q8_0"}) is None
    qc, _ = parse(["--model", "m", "--kquant", "Q2_K", "--kquant-type", "mlp.down_proj=Q3_K"])
    qc.validate()
    assert qc.kquant == "q2_k" and qc.kquant_types == {"mlp.down_proj": "q3_k"}
    for argv, msg in ((["--kquant-type", "mlp.down_proj=q3_k"], "per layer over --kquant"),
                      (["--kquant", "q4_k", "--kquant-type", "mlp.down_proj=q9"], "the type must be one of")):
        with pytest.raises(ValueError, match=msg):
            parse(["--model", "m", *argv])[0].validate()
    with pytest.raises(SystemExit):
        parse(["--model", "m", "--kquant", "q4_k", "--kquant-type", "mlp.down_proj"])


def _kron_loss(W, Q, H_col, H_row, n_heads):
    """BoA's objective: sum_h tr(dW_h H_col dW_h^T H_row,h) (one shared H_col)."""
    D = (Q - W).double().reshape(n_heads, -1, W.shape[1])
    return float(sum(torch.trace(D[h].T @ H_row[h].double() @ D[h] @ H_col.double()) for h in range(n_heads)))


@pytest.mark.parametrize("name,joint", [("q2_k", 1), ("q4_k", 4), ("q3_k", 2)])
def test_boa_on_a_kquant_grid_writes_its_own_weights_and_beats_gptq_on_its_objective(name, joint):
    from lowmem_boa.solvers import boa_quantize
    W, H = _problem(R=16, seed=5)
    g = torch.Generator().manual_seed(6)
    n_heads, dh = 2, 8
    A = torch.randn(n_heads, dh, 3 * dh, generator=g)
    H_row = A @ A.transpose(1, 2) / (3 * dh) + 0.5 * torch.ones(n_heads, dh, dh)   # strongly coupled rows
    res = boa_quantize(W, H, H_row, n_heads, 0, kquant=name, joint_rows=joint)
    assert torch.equal(_file_weights(res.codes, res.kquant, name, W.shape), res.Q)
    assert torch.equal(res.dequantize(), res.Q)
    gq = gptq_quantize(W, H, 0, kquant=name)
    assert _kron_loss(W, res.Q, H, H_row, n_heads) < _kron_loss(W, gq.Q, H, H_row, n_heads)
    # the rows' order is the caller's: with row act-order the fields follow their rows
    ro = boa_quantize(W, H, H_row, n_heads, 0, kquant=name, joint_rows=joint, act_order_row=True)
    assert torch.equal(_file_weights(ro.codes, ro.kquant, name, W.shape), ro.Q)


def _plain_grid_error(x, name, imp):
    """Slow reference of the earlier search: per sub-block the best of the shrunk ranges (no
    least-squares refit, no integer neighbours), integers by plain rounding, weighted error."""
    from lowmem_boa.solvers.kquant import SHRINK, ktype
    kt = ktype(name)
    maxq = 2 ** kt.bits - 1
    total = 0.0
    for r in range(x.shape[0]):
        for b0 in range(0, x.shape[1], kt.block):
            blk, w = x[r, b0:b0 + kt.block].double(), imp[b0:b0 + kt.block].double()
            subs = []
            for j in range(0, kt.block, kt.sub):
                xs, ws, best = blk[j:j + kt.sub], w[j:j + kt.sub], None
                for p in SHRINK.tolist():
                    if kt.offset:
                        lo, hi = min(float(xs.min()), 0.0) * p, max(float(xs.max()), 0.0) * p
                        s = (hi - lo) / maxq or 1.0
                        q = torch.clamp(torch.round((xs - lo) / s), 0, maxq)
                        e, cand = float((ws * (s * q + lo - xs) ** 2).sum()), (s, -lo)
                    else:
                        big = float(xs[xs.abs().argmax()]) * p
                        s = -big / kt.zero or 1.0
                        q = torch.clamp(torch.round(xs / s) + kt.zero, 0, maxq)
                        e, cand = float((ws * (s * (q - kt.zero) - xs) ** 2).sum()), (s, None)
                    if best is None or e < best[0]:
                        best = (e, cand)
                subs.append(best[1])
            if kt.legacy:
                s, m = subs[0]
                s = float(torch.tensor(s).half()) or 2.0 ** -24
                m = 0.0 if m is None else float(torch.tensor(m).half())
                sc, mi, d, dmin = [1.0], [1.0], s, m
            elif kt.offset:
                d = float(torch.tensor(max(s for s, _ in subs) / kt.sc_max).half())
                mm = max(m for _, m in subs)
                dmin = float(torch.tensor(mm / kt.sc_max if mm > 0 else 1.0).half())
                sc = [min(max(round(s / d), 1), kt.sc_max) for s, _ in subs]
                mi = [min(max(round(m / dmin), 0), kt.sc_max) for _, m in subs]
            else:
                d = float(torch.tensor(max(abs(s) for s, _ in subs) / kt.sc_max).half())
                sc = [min(max(round(s / d), -kt.sc_max - 1), kt.sc_max) or 1 for s, _ in subs]
                mi, dmin = [0] * len(subs), 0.0
            for j, (c, mm) in enumerate(zip(sc, mi)):
                xs, ws = blk[j * kt.sub:(j + 1) * kt.sub], w[j * kt.sub:(j + 1) * kt.sub]
                s, z = d * c, dmin * mm
                if kt.offset:
                    q = torch.clamp(torch.round((xs + z) / s), 0, maxq)
                    total += float((ws * (s * q - z - xs) ** 2).sum())
                else:
                    q = torch.clamp(torch.round(xs / s) + kt.zero, 0, maxq)
                    total += float((ws * (s * (q - kt.zero) - xs) ** 2).sum())
    return total


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q6_k", "q4_0", "q5_1"])
def test_grid_search_beats_plain_range_search_with_outlier_importance(name):
    """The least-squares refit and the integer-neighbour search lower the importance-weighted error of
    rounding onto the stored grid against the plain shrunk-range search (a slow per-sub-block
    reference), with importance as activations give it: a few columns thousands of times the rest."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 512, generator=g) * 0.05 * torch.exp(0.5 * torch.randn(16, 1, generator=g))
    imp = torch.rand(512, generator=g) * 0.01 + 0.005
    imp[torch.randperm(512, generator=g)[:6]] = 30.0
    grid = superblock_grid(x.reshape(16, -1, KTYPES[name].block), name, imp.reshape(-1, KTYPES[name].block))
    w = dequantize(quantize(x.reshape(16, -1, KTYPES[name].block), grid.scale, grid.zero, KTYPES[name]),
                   grid.scale, grid.zero, KTYPES[name]).reshape(16, 512)
    ours = float((imp * (w - x) ** 2).sum())
    plain = _plain_grid_error(x, name, imp)
    assert ours < 0.9 * plain, (ours, plain)


@pytest.mark.parametrize("name", ["q8_0", "q6_k", "q4_k", "q4_0", "q2_k"])
def test_embedding_rounding_is_what_the_file_stores_and_no_worse_than_llama_cpp(name):
    """``quantize_tensor`` (the embedding / output head under ``--kquant-embedding``): the GGUF blocks
    it stores dequantize (``gguf`` reader) to exactly its weight, the same input gives the same bytes,
    and for Q8_0 its error is never above llama.cpp's reference rounding (``d = amax / 127``, rounded
    to nearest), which is one of the grids it searches."""
    from lowmem_boa.export.gguf_file import KQuantTensor
    from lowmem_boa.solvers.kquant import quantize_tensor
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 512, generator=g) * 0.02
    w[3, 17] = 0.5                                    # an outlier, as embeddings have
    codes, fields, deq = quantize_tensor(w, name)
    raw, qtype = KQuantTensor(codes, fields).blocks()
    assert qtype.name.lower() == name
    back = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
    assert np.array_equal(back, deq.numpy())
    assert torch.equal(quantize_tensor(w.clone(), name)[0], codes)
    if name == "q8_0":
        x = w.reshape(-1, 32)
        d = (x.abs().amax(-1, keepdim=True) / 127).to(torch.float16).float()
        ref = torch.round(x / d).clamp(-128, 127) * d
        assert float((deq.reshape(-1, 32) - x).pow(2).sum()) <= float((ref - x).pow(2).sum()) * (1 + 1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_tensor(w[:, :96], "q6_k")


def test_embedding_type_rule():
    from lowmem_boa.solvers.kquant import embedding_type
    assert embedding_type(None, 576) == "q8_0" and embedding_type("auto", 4096) == "q6_k"   # llama.cpp's output head
    assert embedding_type("float", 576) is None and embedding_type("Q4_0", 576) == "q4_0"
    with pytest.raises(ValueError, match="--kquant-embedding q6_k"):
        embedding_type("q6_k", 576)


def test_llama_cpp_file_types_give_llama_cpps_own_types():
    """``--kquant q2_k_m / q3_k_s … q5_k_m``: every linear of every SmolLM2 block gets the type llama.cpp's
    own quantizer chose for that file type (recorded from its files by ``benchmarks/llamacpp_check.py
    --file-types``: 30 blocks, GQA 3, 576-input layers falling back to 32-column types)."""
    import json
    from pathlib import Path
    from lowmem_boa.solvers.kquant import FILE_TYPES, layer_type, llama_file_type_overrides
    rec = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "llamacpp_file_types.json")
                     .read_text())
    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
    assert set(rec["file_types"]) == set(FILE_TYPES)
    for ft, got in rec["file_types"].items():
        over = llama_file_type_overrides(ft, list(rec["in_features"]), rec["n_blocks"], rec["n_gqa"])
        for i in range(rec["n_blocks"]):
            for name, cols in rec["in_features"].items():
                assert layer_type(ft, cols, name, over, i) == got["llama_cpp"][f"blk.{i}.{gguf_names[name]}.weight"], \
                    (ft, i, name)
    # the user's own --kquant-type wins over a file type's rule, one block over every block
    assert layer_type("q4_k_m", 4096, "mlp.down_proj", {"0.mlp.down_proj": "q2_k", "mlp.down_proj": "q3_k"}, 0) == "q2_k"
    assert layer_type("q4_k_m", 4096, "mlp.down_proj", {"0.mlp.down_proj": "q2_k", "mlp.down_proj": "q3_k"}, 1) == "q3_k"
    with pytest.raises(ValueError, match="unknown llama.cpp file type"):
        llama_file_type_overrides("q7_k_m", ["mlp.down_proj"], 4, 1)


def test_override_keys_and_file_type_labels():
    """``--kquant-type`` keys name a layer for every block or for one block (a number that is no block index
    stays part of the name); every ``--kquant`` choice declares a ``general.file_type`` the ``gguf`` package
    knows, llama.cpp's own for a file type (one-type k-quants are its _S file type; q2_k its Q2_K)."""
    from lowmem_boa.solvers.kquant import FILE_TYPES, GGUF_FILE_TYPE, override_layer
    assert override_layer("mlp.down_proj", 30) == "mlp.down_proj"
    assert override_layer("29.mlp.down_proj", 30) == "mlp.down_proj"
    assert override_layer("30.mlp.down_proj", 30) == "30.mlp.down_proj"    # no block 30: refused as unknown layer
    assert set(GGUF_FILE_TYPE) == set(K_TYPES) | set(FILE_TYPES)
    for choice, label in GGUF_FILE_TYPE.items():
        assert hasattr(gguf.LlamaFileType, label), choice
        assert label.lower().removeprefix("mostly_").startswith(choice[:4])
    assert GGUF_FILE_TYPE["q4_k_m"] == "MOSTLY_Q4_K_M" and GGUF_FILE_TYPE["q2_k_m"] == GGUF_FILE_TYPE["q2_k"]
