"""Where does BoA help the attention output, and where not? One projection at a time.

For each block of a (small) model: collect the block's calibration statistics exactly as the
pipeline does (original model, block inputs from the unquantized model), then quantize *only*
q, *only* k or *only* v with GPTQ and with BoA and measure on held-out windows

    rel. attention-output error = ||MHA(X; one projection quantized) - MHA_fp(X)||^2 / ||MHA_fp(X)||^2

next to each method's own objective on the calibration data (GPTQ: tr(dW H_col dW^T); BoA: the
Kronecker objective). This separates "the relaxed row Hessian is a poor surrogate here" from
"the solver did not minimise it".

    python benchmarks/diagnose_attention.py --model llama-wt2-9m --bits 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmem_boa.data import calibration_windows, eval_windows, load_source  # noqa: E402
from lowmem_boa.forward import capture_input, capture_output  # noqa: E402
from lowmem_boa.models import get_adapter  # noqa: E402
from lowmem_boa.solvers import attention_loss, boa_quantize, gptq_quantize, layer_loss  # noqa: E402
from lowmem_boa.stats import attention_grams, block_v_grams, gram, qk_row_hessians, wout_row_hessian  # noqa: E402


def block_inputs(model, adapter, ids, chunk=16):
    """Inputs (and kwargs) of every block of the unquantized model, via pre-hooks."""
    layers = model.get_submodule(adapter.blocks_prefix)
    store = {i: [] for i in range(len(layers))}
    kw = {}

    def mk(i):
        def hook(mod, args, kwargs):
            store[i].append(args[0])
            kw.setdefault(i, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache",
                                                                          "cache_position")})
        return hook
    hs = [layers[i].register_forward_pre_hook(mk(i), with_kwargs=True) for i in range(len(layers))]
    with torch.no_grad():
        for i0 in range(0, ids.shape[0], chunk):
            model(ids[i0:i0 + chunk], use_cache=False)
    for h in hs:
        h.remove()
    return {i: torch.cat(v) for i, v in store.items()}, kw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--model", default="llama-wt2-9m")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--held", type=int, default=32)
    ap.add_argument("--grid", default="hessian")
    ap.add_argument("--act-order", action="store_true", help="act_order_col for both (and act_order_row for BoA)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    mdir = args.shared / "models" / args.model
    data = str(args.shared / "data")
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="sdpa").eval()
    adapter = get_adapter(model.config)
    h = adapter.heads
    tok = AutoTokenizer.from_pretrained(mdir)
    calib = calibration_windows(tok, load_source("wikitext2", "train", data), args.nsamples, args.seqlen, 0)
    held = eval_windows(tok, load_source("wikitext2", "valid", data), args.seqlen, args.held)
    Xc_blocks, kw = block_inputs(model, adapter, calib)
    Xh_blocks, _ = block_inputs(model, adapter, held)
    rows = []
    torch.set_grad_enabled(False)
    for b in range(adapter.n_blocks):
        block = model.get_submodule(adapter.block_name(b))
        k = kw[b]
        Xc, Xh = Xc_blocks[b], Xh_blocks[b]
        # statistics as the pipeline computes them (means over tokens)
        H = torch.zeros(h.hidden_size, h.hidden_size)
        Gk = torch.zeros(h.n_kv_heads, h.head_dim, h.head_dim)
        Gq = torch.zeros_like(Gk)
        Hv = torch.zeros(h.n_kv_heads, h.hidden_size, h.hidden_size)
        for i0 in range(0, Xc.shape[0], 8):
            x = capture_input(block, adapter.q_proj, Xc[i0:i0 + 8], k)
            H += gram(x)
            st = adapter.attention_states(block, x, k)
            gk, gq = attention_grams(st, h.n_rep)
            Gk += gk
            Gq += gq
            Hv += block_v_grams(x, st, h.n_rep, range(0, h.n_heads))
        ntok = Xc.shape[0] * Xc.shape[1]
        H, Gk, Gq, Hv = H / ntok, Gk / ntok, Gq / ntok, Hv / ntok
        cs = adapter.rope_cos_sin(k, args.seqlen) if adapter.uses_rope else None
        qn, kn = adapter.qk_norm_weights(block)
        Hq, Hk = qk_row_hessians(Gk, Gq, h.n_rep, cs, qn, kn)
        W_o = block.get_submodule(adapter.o_proj).weight
        Hrv = wout_row_hessian(W_o, h.n_heads, h.n_kv_heads, h.head_dim)
        ref = torch.cat([capture_output(block, adapter.o_proj, Xh[i:i + 8], k) for i in range(0, Xh.shape[0], 8)])
        denom = float(ref.double().pow(2).sum())
        specs = {"q": (adapter.q_proj, Hq, h.n_heads, H), "k": (adapter.k_proj, Hk, h.n_kv_heads, H),
                 "v": (adapter.v_proj, Hrv, h.n_kv_heads, Hv)}
        for p, (name, Hrow, nh, Hcol_boa) in specs.items():
            lin = block.get_submodule(name)
            W = lin.weight.data.clone()
            out = {"block": b, "proj": p}
            for method in ("gptq", "boa", "boa-shared-H"):
                if method == "gptq":
                    res = gptq_quantize(W, H, args.bits, grid=args.grid, act_order=args.act_order)
                else:
                    Hc = Hcol_boa if method == "boa" else H
                    if method == "boa-shared-H" and p != "v":
                        continue
                    res = boa_quantize(W, Hc, Hrow, nh, args.bits, grid=args.grid, act_order_col=args.act_order,
                                       act_order_row=args.act_order)
                lin.weight.data = res.Q
                y = torch.cat([capture_output(block, adapter.o_proj, Xh[i:i + 8], k) for i in range(0, Xh.shape[0], 8)])
                lin.weight.data = W
                out[f"{method}_attn_err"] = float((y - ref).double().pow(2).sum()) / denom
                out[f"{method}_kron_obj"] = float(attention_loss(W, res.Q, Hcol_boa, Hrow))
                out[f"{method}_layer_obj"] = float(layer_loss(W, res.Q, H))
            rows.append(out)
            print(json.dumps(out), flush=True)
    print("\n| block | proj | held-out attn error GPTQ | BoA | BoA/GPTQ | Kronecker objective GPTQ | BoA "
          "| layer objective GPTQ | BoA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['proj']} | {r['gptq_attn_err']:.5f} | {r['boa_attn_err']:.5f} | "
              f"{r['boa_attn_err'] / r['gptq_attn_err']:.3f} | {r['gptq_kron_obj']:.4g} | {r['boa_kron_obj']:.4g} | "
              f"{r['gptq_layer_obj']:.4g} | {r['boa_layer_obj']:.4g} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
