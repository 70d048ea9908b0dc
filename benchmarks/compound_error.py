"""How do the per-block errors of a quantized model compound? Hidden states through the whole model.

``quality.py --errors`` judges each block on the *original* model's inputs. This script runs the full
quantized model next to the full-precision one on held-out windows and reports, after every block,

* ``raw``: ``||h_q - h_fp||^2 / ||h_fp||^2`` of the residual stream (dominated by the few huge
  channels a Llama residual stream carries),
* ``normed``: the same after scaling every token's vector to unit RMS (what the next RMSNorm sees),

and at the end the mean KL(fp || quantized) of the next-token distributions and the perplexity of each
model on these windows. Every model sees the same token windows. For the full-precision model it also
prints where the residual stream's squared norm sits: the share held by each window's largest token
and that token's position (a "massive activation" / attention-sink token shows as a share near 1), and
the same share of the trace of each MLP-output layer's input Gram (``H_col`` of ``down_proj`` / ``fc2``
on these windows, the matrix GPTQ and BoA solve that layer with). ``--layers B`` adds, for block B, each
linear layer's own output error ``||(Q - W) x||^2 / ||W x||^2`` on the fp model's inputs, over all tokens
and without each window's largest token at that block's output (is a layer fitted to one token?).

    OMP_NUM_THREADS=1 python benchmarks/compound_error.py --fp ~/.cache/lowmem_boa/smollm2-135m \
        --model gptq-turbo=benchmarks/_work/quality/smollm2-135m/gptq-turbo-w2-n128-s0 \
        --model boa-turbo-fast=benchmarks/_work/quality/smollm2-135m/boa-turbo-fast-w2-n128-s0 \
        --text c4 --windows 4 --seqlen 2048
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmem_boa.data import eval_windows, load_source  # noqa: E402
from lowmem_boa.models import get_adapter  # noqa: E402

SPLITS = {"wikitext2": ("wikitext2", "test"), "c4": ("c4", "valid"), "ptb": ("ptb", "test")}


def hidden_and_logprobs(model, ids):
    with torch.no_grad():
        out = model(ids[None], output_hidden_states=True)
    return [h[0].double() for h in out.hidden_states], torch.log_softmax(out.logits[0].double(), -1)


def unit_rms(h):
    return h / h.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp", required=True, help="the full-precision checkpoint (directory)")
    ap.add_argument("--model", action="append", required=True,
                    help="LABEL=DIR of a quantized checkpoint; LABEL=DIR+DONOR:B1,B2 takes blocks B1, B2 from the "
                         "checkpoint DONOR instead (are the blocks of two runs interchangeable?)")
    ap.add_argument("--text", choices=sorted(SPLITS), default="c4")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--layers", type=int, default=None, metavar="B",
                    help="also each linear layer's own error in block B, with and without the largest token")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)

    labelled = []
    for spec in args.model:
        label, sep, rest = spec.partition("=")
        path, _, graft = rest.partition("+")
        donor, _, blocks = graft.rpartition(":")
        try:
            blocks = [int(b) for b in blocks.split(",")] if graft else []
        except ValueError:
            blocks = None
        if not sep or not Path(path).is_dir() or (graft and (not Path(donor).is_dir() or not blocks)):
            ap.error(f"--model {spec!r}: expected LABEL=DIR or LABEL=DIR+DONOR:B1,B2 with existing directories")
        labelled.append((label, path, donor, blocks))

    tok = AutoTokenizer.from_pretrained(args.fp)
    ids = eval_windows(tok, load_source(*SPLITS[args.text], data_dir=args.data_dir), args.seqlen, args.windows)
    fp = AutoModelForCausalLM.from_pretrained(args.fp, dtype=torch.float32).eval()
    adapter = get_adapter(fp.config)
    mlp_in_sq = {}   # block -> per window, the squared norm of each token's MLP-output-layer input

    def record(i):
        def pre_hook(module, inputs):
            mlp_in_sq.setdefault(i, []).append(inputs[0][0].double().pow(2).sum(-1))
        return pre_hook

    hooks = [fp.get_submodule(f"{adapter.block_name(i)}.{adapter.mlp_out}").register_forward_pre_hook(record(i))
             for i in range(len(fp.get_submodule(adapter.blocks_prefix)))]
    layer_names = [n for group in adapter.quant_groups() for n in group]
    layer_inputs, fp_weights = {}, {}   # --layers B: per layer, each window's inputs; the fp weights
    if args.layers is not None:
        for n in layer_names:
            module = fp.get_submodule(f"{adapter.block_name(args.layers)}.{n}")
            fp_weights[n] = module.weight.detach().double()
            hooks.append(module.register_forward_pre_hook(
                lambda m, inputs, n=n: layer_inputs.setdefault(n, []).append(inputs[0][0].double())))
    ref = [hidden_and_logprobs(fp, w) for w in ids]
    for h in hooks:
        h.remove()
    del fp
    # share of each window's largest token in the trace of sum_t x_t x_t^T, mean over the windows
    mlp_share = [sum((sq.max() / sq.sum()).item() for sq in mlp_in_sq[i]) / len(mlp_in_sq[i])
                 for i in sorted(mlp_in_sq)]
    sink = []   # per state: mean share of the squared norm held by each window's largest token, its positions
    for i in range(len(ref[0][0])):
        shares, positions = [], []
        for hs, _ in ref:
            sq = hs[i].pow(2).sum(-1)
            shares.append((sq.max() / sq.sum()).item())
            positions.append(int(sq.argmax()))
        sink.append((sum(shares) / len(shares), sorted(set(positions))))

    def layer_errors(model):
        """--layers B: {layer: (error over all tokens, error without each window's largest token)}."""
        out = {}
        for n in layer_names:
            dW = model.get_submodule(f"{adapter.block_name(args.layers)}.{n}").weight.detach().double() - fp_weights[n]
            num = den = num_rest = den_rest = 0.0
            for x, (hs, _) in zip(layer_inputs[n], ref):
                e, y = (x @ dW.T).pow(2).sum(-1), (x @ fp_weights[n].T).pow(2).sum(-1)
                top = int(hs[args.layers + 1].pow(2).sum(-1).argmax())
                num, den = num + e.sum().item(), den + y.sum().item()
                num_rest, den_rest = num_rest + e.sum().item() - e[top].item(), den_rest + y.sum().item() - y[top].item()
            out[n] = (num / den, num_rest / den_rest)
        return out

    def nll(logp, w):
        return -logp[:-1].gather(-1, w[1:, None]).mean().item()

    result = {"text": args.text, "windows": int(ids.shape[0]), "seqlen": args.seqlen,
              "fp_ppl": float(torch.tensor([nll(lp, w) for (_, lp), w in zip(ref, ids)]).mean().exp()),
              "largest_token_share": [sh for sh, _ in sink], "mlp_out_input_gram_share": mlp_share,
              "largest_token_positions": [p for _, p in sink],
              "models": {}}
    for label, path, donor, blocks in labelled:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if blocks:
            donor_model = AutoModelForCausalLM.from_pretrained(donor, dtype=torch.float32)
            for b in blocks:
                name = adapter.block_name(b)
                model.get_submodule(name).load_state_dict(donor_model.get_submodule(name).state_dict())
            del donor_model
        n_states = len(ref[0][0])
        num_raw = [0.0] * n_states
        num_norm = [0.0] * n_states
        den_raw = [0.0] * n_states
        den_norm = [0.0] * n_states
        kl, nlls = [], []
        for (hs_fp, lp_fp), w in zip(ref, ids):
            hs, lp = hidden_and_logprobs(model, w)
            for i, (a, b) in enumerate(zip(hs, hs_fp)):
                num_raw[i] += (a - b).pow(2).sum().item()
                den_raw[i] += b.pow(2).sum().item()
                na, nb = unit_rms(a), unit_rms(b)
                num_norm[i] += (na - nb).pow(2).sum().item()
                den_norm[i] += nb.pow(2).sum().item()
            kl.append((lp_fp.exp() * (lp_fp - lp)).sum(-1).mean().item())
            nlls.append(nll(lp, w))
        result["models"][label] = {
            **({"layers": layer_errors(model)} if args.layers is not None else {}),
            "raw": [n / d for n, d in zip(num_raw, den_raw)],
            "normed": [n / d for n, d in zip(num_norm, den_norm)],
            "kl": sum(kl) / len(kl),
            "ppl": float(torch.tensor(nlls).mean().exp()),
        }
        del model

    labels = [label for label, *_ in labelled]
    print(f"{args.text}: {result['windows']} windows of {args.seqlen}; fp perplexity {result['fp_ppl']:.3f}")
    print("state  " + "  ".join(f"{lab:>22}" for lab in labels)
          + "    (raw / normed relative error; fp: largest token's share of ||h||^2, its positions;"
          " of the MLP-output layer's H_col trace)")
    n_states = len(result["models"][labels[0]]["raw"])
    for i in range(1, n_states):
        name = f"blk {i - 1:2d}" if i < n_states - 1 else "final "
        print(f"{name} " + "  ".join(f"{result['models'][lab]['raw'][i]:10.4f} / {result['models'][lab]['normed'][i]:.4f}"
                                     for lab in labels)
              + f"    {sink[i][0]:.3f} {sink[i][1]}" + (f"  {mlp_share[i - 1]:.3f}" if i - 1 < len(mlp_share) else ""))
    if args.layers is not None:
        print(f"block {args.layers}, each layer's own error on the fp inputs: all tokens / without each window's "
              "largest token")
        for n in layer_names:
            print(f"  {n:24s} " + "  ".join(f"{result['models'][lab]['layers'][n][0]:.4f} / "
                                            f"{result['models'][lab]['layers'][n][1]:.4f}" for lab in labels))
    for lab in labels:
        m = result["models"][lab]
        print(f"{lab}: perplexity {m['ppl']:.3f}, KL(fp || q) {m['kl']:.4f} nats/token")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
