"""Attention statistics of one block == brute force through the transformers modules themselves."""

import pytest
import torch

from lowmem_boa.forward import capture_input
from lowmem_boa.models import get_adapter
from lowmem_boa.stats import (attention_grams, block_v_cross_grams, block_v_grams, causal_attention_probs, gram,
                              qk_row_hessians, rope_average, wout_row_hessian)

from tiny_models import tiny_config, tiny_model

FAMILIES = ["opt", "llama", "qwen2", "qwen3"]


def _block_inputs(model, x_ids):
    """Block-0 input and the kwargs the model passes to it, via a pre-hook."""
    box = {}
    layers = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers

    def hook(mod, args, kwargs):
        box["h"], box["kw"] = args[0], kwargs
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(x_ids, use_cache=False)
    handle.remove()
    kw = {k: v for k, v in box["kw"].items() if k not in ("past_key_values", "use_cache", "cache_position")}
    return layers[0], box["h"], kw


def _attention_input(family, seed, ids_seed, L):
    """A tiny model's block 0: its adapter, the block, the forward kwargs, the attention input of two
    random windows of ``L`` tokens and its attention states."""
    model = tiny_model(family, seed=seed)
    adapter = get_adapter(model.config)
    ids = torch.randint(2, 8192, (2, L), generator=torch.Generator().manual_seed(ids_seed))
    block, h, kw = _block_inputs(model, ids)
    with torch.no_grad():
        x = capture_input(block, adapter.q_proj, h, kw)
        st = adapter.attention_states(block, x, kw)
    return adapter, block, kw, x, st


def _hf_attention_internals(attn, x, kw):
    """q/k (post norm + RoPE), attention probabilities and output of the HF module (eager)."""
    box = {}
    import transformers.integrations  # noqa: F401

    def capture(module, query, key, value, attention_mask, **kwargs):
        box["q"], box["k"], box["v"] = query, key, value
        return orig(module, query, key, value, attention_mask, **kwargs)
    mod = __import__(type(attn).__module__, fromlist=["eager_attention_forward"])
    orig = mod.eager_attention_forward
    mod.eager_attention_forward = capture
    try:
        with torch.no_grad():
            out, weights = attn(hidden_states=x, **{k: v for k, v in kw.items() if k != "position_ids"})
    finally:
        mod.eager_attention_forward = orig
    return box, weights, out


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_states_match_the_model(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    ids = torch.randint(2, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    block, h, kw = _block_inputs(model, ids)
    with torch.no_grad():
        x = capture_input(block, adapter.q_proj, h, kw)
        st = adapter.attention_states(block, x, kw)
    box, hf_probs, hf_out = _hf_attention_internals(adapter.attention(block), x, kw)
    scale_q = adapter.attention(block).scaling if family == "opt" else 1.0  # OPT pre-scales q
    assert torch.allclose(st.q * scale_q, box["q"], atol=1e-5)
    assert torch.allclose(st.k, box["k"], atol=1e-5)
    assert torch.allclose(st.v, box["v"], atol=1e-5)
    # our causal softmax equals the model's attention probabilities (GQA: KV head h // n_rep)
    n_rep = adapter.heads.n_rep
    k_rep = st.k.repeat_interleave(n_rep, dim=1)
    probs = causal_attention_probs(st.q, k_rep, st.scaling)
    assert torch.allclose(probs, hf_probs, atol=1e-5)
    # and the module output is sum_h W_out,h (A_h V_h)^T (the head layout Table 1 assumes)
    W_o = block.get_submodule(adapter.o_proj).weight
    b_o = block.get_submodule(adapter.o_proj).bias
    hd = adapter.heads.head_dim
    AV = probs @ st.v.repeat_interleave(n_rep, dim=1)                       # (B, H, L, dh)
    out = sum(AV[:, hh] @ W_o[:, hh * hd:(hh + 1) * hd].T for hh in range(adapter.heads.n_heads))
    out = out + (b_o if b_o is not None else 0)
    assert torch.allclose(out, hf_out, atol=1e-4)


def _explicit_rotations(cos, sin):
    """R_t as explicit matrices: R_t e_i is the rotation of basis vector e_i at position t."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    L, dh = cos.shape
    eye = torch.eye(dh, dtype=torch.float64).expand(1, L, dh, dh)          # (1, L, dh(basis), dh)
    rot, _ = apply_rotary_pos_emb(eye, eye, cos.double(), sin.double(), unsqueeze_dim=2)
    return rot[0].transpose(-1, -2)                                          # (L, dh, dh): columns R_t e_i


def test_rope_average_equals_explicit_average():
    cfg = tiny_config("llama")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    L = 40
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float64), torch.arange(L)[None])
    cos, sin = cos[0].double(), sin[0].double()
    R = _explicit_rotations(cos, sin)
    G = torch.randn(3, 16, 16, dtype=torch.float64)
    G = G @ G.transpose(-1, -2)
    explicit = torch.einsum("tji,hjk,tkl->hil", R, G, R) / L                 # mean_t R_t^T G R_t
    assert torch.allclose(rope_average(G, cos, sin), explicit, atol=1e-10)
    # the rotation really is the model's: R_t q == apply_rotary_pos_emb(q) at position t
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q = torch.randn(1, 1, L, 16, dtype=torch.float64)
    q_rot, _ = apply_rotary_pos_emb(q, q, cos[None], sin[None])
    assert torch.allclose(torch.einsum("tij,tj->ti", R, q[0, 0]), q_rot[0, 0], atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_statistics_match_brute_force(family):
    model = tiny_model(family, seed=1)
    adapter = get_adapter(model.config)
    hi = adapter.heads
    L = 20
    ids = torch.randint(2, 8192, (3, L), generator=torch.Generator().manual_seed(1))
    block, h, kw = _block_inputs(model, ids)
    with torch.no_grad():
        x = capture_input(block, adapter.q_proj, h, kw)
        st = adapter.attention_states(block, x, kw)
        box, hf_probs, _ = _hf_attention_internals(adapter.attention(block), x, kw)
    X = x.double().reshape(-1, hi.hidden_size)
    # H_col of q/k/v: X X^T over all tokens
    assert torch.allclose(gram(x).double(), X.T @ X, rtol=1e-5, atol=1e-4)

    # row Hessians: brute force from the definitions with the model's own q/k and rotations
    k_post, q_post = box["k"].double(), box["q"].double()
    if family == "opt":
        q_post = q_post / adapter.attention(block).scaling
    G_k = torch.einsum("bhti,bhtj->hij", k_post, k_post)
    G_q = torch.stack([torch.einsum("bhti,bhtj->ij", q_post[:, j * hi.n_rep:(j + 1) * hi.n_rep],
                                    q_post[:, j * hi.n_rep:(j + 1) * hi.n_rep]) for j in range(hi.n_kv_heads)])
    gk, gq = attention_grams(st, hi.n_rep)
    assert torch.allclose(gk.double(), G_k, rtol=1e-5, atol=1e-4)
    assert torch.allclose(gq.double(), G_q, rtol=1e-5, atol=1e-4)
    cos_sin = adapter.rope_cos_sin(kw, L) if adapter.uses_rope else None
    qn, kn = adapter.qk_norm_weights(block)
    H_q, H_k = qk_row_hessians(gk.double(), gq.double(), hi.n_rep, cos_sin, qn, kn)
    if cos_sin is not None:
        R = _explicit_rotations(*[t.double() for t in cos_sin])
        avg = lambda G: torch.einsum("tji,hjk,tkl->hil", R, G, R) / L  # noqa: E731
        G_k, G_q = avg(G_k), avg(G_q)
    exp_q = torch.stack([G_k[hh // hi.n_rep] for hh in range(hi.n_heads)])
    exp_k = G_q
    if qn is not None:
        exp_q = torch.diag(qn.double()) @ exp_q @ torch.diag(qn.double())
        exp_k = torch.diag(kn.double()) @ exp_k @ torch.diag(kn.double())
    assert H_q.shape == (hi.n_heads, hi.head_dim, hi.head_dim) and H_k.shape == (hi.n_kv_heads, hi.head_dim, hi.head_dim)
    assert torch.allclose(H_q, exp_q, rtol=1e-5, atol=1e-4)
    assert torch.allclose(H_k, exp_k, rtol=1e-5, atol=1e-4)

    # block_v: per KV head, sum over its query heads of X A_h^T A_h X^T with the model's A_h
    exp_v = torch.zeros(hi.n_kv_heads, hi.hidden_size, hi.hidden_size, dtype=torch.float64)
    for hh in range(hi.n_heads):
        for b in range(x.shape[0]):
            Y = hf_probs[b, hh].double() @ x[b].double()                     # rows: sum_u A[t,u] x_u
            exp_v[hh // hi.n_rep] += Y.T @ Y
    got = torch.zeros_like(exp_v)
    step = hi.n_rep  # one KV group at a time, as the pipeline may do under a tight budget
    for h0 in range(0, hi.n_heads, step):
        got[h0 // hi.n_rep:(h0 + step) // hi.n_rep] = block_v_grams(x, st, hi.n_rep, range(h0, h0 + step)).double()
    assert torch.allclose(got, exp_v, rtol=1e-5, atol=1e-4)
    all_at_once = block_v_grams(x, st, hi.n_rep, range(0, hi.n_heads)).double()
    assert torch.allclose(all_at_once, exp_v, rtol=1e-5, atol=1e-4)
    L = x.shape[1]
    for c in (1, 3, L - 1, L):   # query rows in causal chunks (one row at a time, uneven, the whole window)
        by_rows = block_v_grams(x, st, hi.n_rep, range(0, hi.n_heads), row_chunk=c).double()
        assert torch.allclose(by_rows, exp_v, rtol=1e-5, atol=1e-4), c

    # W_out row Hessian of V: sum over the KV head's query heads of W_out,h^T W_out,h
    W_o = block.get_submodule(adapter.o_proj).weight.double()
    exp_o = torch.zeros(hi.n_kv_heads, hi.head_dim, hi.head_dim, dtype=torch.float64)
    for hh in range(hi.n_heads):
        Wh = W_o[:, hh * hi.head_dim:(hh + 1) * hi.head_dim]
        exp_o[hh // hi.n_rep] += Wh.T @ Wh
    assert torch.allclose(wout_row_hessian(W_o, hi.n_heads, hi.n_kv_heads, hi.head_dim).double(), exp_o, rtol=1e-5, atol=1e-6)


def test_relaxed_q_loss_is_the_kronecker_form_without_rope():
    """Without RoPE (OPT) the relaxed Q objective sum_t ||K dW x_t||^2 equals
    tr(H_row dW H_col dW^T) with H_col = X X^T and H_row = K^T K, exactly (eq. 15)."""
    adapter, block, kw, x, st = _attention_input("opt", 2, 2, 16)
    hi = adapter.heads
    gk, gq = attention_grams(st, hi.n_rep)
    H_q, _ = qk_row_hessians(gk.double(), gq.double(), hi.n_rep)
    X = x.double().reshape(-1, hi.hidden_size)
    dW = torch.randn(hi.n_heads, hi.head_dim, hi.hidden_size, dtype=torch.float64) * 1e-2
    K = st.k.double()                                                       # (B, H, L, dh)
    direct = sum(float(((K[:, hh].reshape(-1, hi.head_dim)) @ dW[hh] @ X.T).pow(2).sum()) for hh in range(hi.n_heads))
    kron = sum(float(torch.trace(H_q[hh] @ dW[hh] @ (X.T @ X) @ dW[hh].T)) for hh in range(hi.n_heads))
    assert abs(direct - kron) <= 1e-8 * abs(direct)


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config
    with pytest.raises(ValueError, match="unsupported model.*gpt2.*Supported:.*OPT.*Llama.*Qwen2.*Qwen3"):
        get_adapter(GPT2Config())


def test_heads_come_from_the_config():
    for fam, (H, Hkv, dh) in {"opt": (4, 4, 16), "llama": (4, 2, 16), "qwen3": (4, 2, 16)}.items():
        hi = get_adapter(tiny_config(fam)).heads
        assert (hi.n_heads, hi.n_kv_heads, hi.head_dim) == (H, Hkv, dh)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_v_cross_grams_match_brute_force(family):
    """``--block-v-targets``: per KV head ``sum Y_fp,h^T Y_h`` (``Y = A X``, each stream with its own
    attention maps, the model's) and ``sum Y_h^T Y_h``; the latter bit for bit ``block_v_grams``; on
    one stream the cross Grams equal ``H``."""
    adapter, block, kw, x, st = _attention_input(family, 3, 4, 18)
    hi = adapter.heads
    with torch.no_grad():
        x_fp = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        st_fp = adapter.attention_states(block, x_fp, kw)
        probs = _hf_attention_internals(adapter.attention(block), x, kw)[1]
        probs_fp = _hf_attention_internals(adapter.attention(block), x_fp, kw)[1]
    exp_h = torch.zeros(hi.n_kv_heads, hi.hidden_size, hi.hidden_size, dtype=torch.float64)
    exp_c = torch.zeros_like(exp_h)
    for hh in range(hi.n_heads):
        for b in range(x.shape[0]):
            Y = probs[b, hh].double() @ x[b].double()
            Yf = probs_fp[b, hh].double() @ x_fp[b].double()
            exp_h[hh // hi.n_rep] += Y.T @ Y
            exp_c[hh // hi.n_rep] += Yf.T @ Y
    assert not torch.allclose(exp_c, exp_h, rtol=1e-2)      # the streams really differ
    L = x.shape[1]
    for c in (None, 5, L):
        for h0, h1 in ((0, hi.n_heads), (0, hi.n_rep)):
            H, C = block_v_cross_grams(x, st, x_fp, st_fp, hi.n_rep, range(h0, h1), row_chunk=c)
            k0, k1 = h0 // hi.n_rep, h1 // hi.n_rep
            assert torch.allclose(H.double(), exp_h[k0:k1], rtol=1e-5, atol=1e-4)
            assert torch.allclose(C.double(), exp_c[k0:k1], rtol=1e-5, atol=1e-4)
            assert torch.equal(H, block_v_grams(x, st, hi.n_rep, range(h0, h1), row_chunk=c))
    H, C = block_v_cross_grams(x, st, x, st, hi.n_rep, range(0, hi.n_heads))
    assert torch.equal(H, C)
