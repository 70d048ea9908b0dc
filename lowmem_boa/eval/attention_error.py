"""Per-block output errors of a quantized model against its original, block by block.

For every block ``i`` the inputs ``X_i`` are the *original* model's block inputs on held-out
windows, so each block is judged on its own:

* ``rel_error`` (attention): ``sum ||MHA_q(X_i) - MHA_fp(X_i)||^2 / sum ||MHA_fp(X_i)||^2`` over all
  tokens, where ``MHA`` is the attention module's output (after the out-projection, before the
  residual). This is the quantity BoA's attention-aware Hessians target.
* ``block_rel_error``: the whole quantized block on ``X_i`` against the original block, relative to
  what the original block adds to the residual stream: ``||B_q(X) - B_fp(X)||^2 / ||B_fp(X) - X||^2``.
* ``layers``: every linear layer on its own original input ``x`` (the fp block's, on ``X_i``):
  ``||(Q - W) x||^2 / ||W x||^2`` -- the layer objective ``tr(dW H dW^T) / tr(W H W^T)`` with ``H``
  taken from these windows instead of the calibration text, i.e. where in the model an error
  measured out of domain comes from.

Streams one block at a time like everything else.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..forward import block_forward, first_block_inputs
from ..models import get_adapter
from ..scheduler import ActivationStore, Ledger, Scheduler, build_skeleton, load_config, open_checkpoint
from ..scheduler.planner import make_eval_plan


OUT = "attention output"


def _keep_output(block: torch.nn.Module, layer: str, box: dict):
    """Keep ``block.<layer>``'s output in ``box[OUT]`` whenever the block runs (one forward gives
    both the attention output and the block output)."""
    def hook(module, args, out):
        box[OUT] = out[0] if isinstance(out, tuple) else out
    return block.get_submodule(layer).register_forward_hook(hook)


def _sq(t: torch.Tensor) -> float:
    return float(t.double().pow(2).sum())


def attention_output_errors(fp_dir: str | Path, q_dir: str | Path, windows: torch.Tensor, device: torch.device,
                            budget: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    """One dict per block: ``rel_error`` (attention output), ``block_rel_error`` and ``layers``
    (``{name: relative output error}``), with the squared sums they come from."""
    config = load_config(str(fp_dir))
    adapter = get_adapter(config)
    fp_reader, q_reader = open_checkpoint(fp_dir), open_checkpoint(q_dir)
    model = build_skeleton(config, dtype)
    n, L = windows.shape
    plan = make_eval_plan(adapter, n, L, torch.empty((), dtype=dtype).element_size(), budget)
    sch = Scheduler(model, fp_reader, device, Ledger(device, budget), dtype)
    store = ActivationStore(n, L, adapter.heads.hidden_size, dtype)
    attn_fp = torch.empty(n, L, adapter.heads.hidden_size, dtype=torch.float32)
    prefix = getattr(model, "base_model_prefix", "model")
    linears = adapter.linear_names()
    out = []
    with torch.inference_mode():
        kwargs = first_block_inputs(sch, model, adapter, windows, store, plan.chunk)
        for i in range(adapter.n_blocks):
            name = adapter.block_name(i)
            q_weights = {f"{name}.{k}": q_reader.get(q_reader.resolve(f"{name}.{k}", prefix))
                         for k, _ in model.get_submodule(name).named_parameters()}
            lay = {l: [0.0, 0.0] for l in linears}
            with sch.resident([name], f"block {i} (original)") as (blk,):
                dW = {l: sch.to_device(q_weights[f"{name}.{l}.weight"], f"dW {l}").to(dtype)
                      - blk.get_submodule(l).weight for l in linears}
                inputs = {}
                hooks = [blk.get_submodule(l).register_forward_pre_hook(
                    lambda m, a, l=l: inputs.__setitem__(l, a[0])) for l in linears]
                hooks.append(_keep_output(blk, adapter.o_proj, inputs))
                try:
                    for i0, i1, x in sch.chunks(store.inputs, plan.chunk):
                        sch.store(store.outputs, i0, i1, block_forward(blk, x, kwargs))
                        attn_fp[i0:i1] = sch.to_host(inputs[OUT].float())
                        for l in linears:
                            xi = inputs[l].float()
                            lay[l][0] += _sq(xi @ dW[l].float().T)
                            lay[l][1] += _sq(xi @ blk.get_submodule(l).weight.float().T)
                        inputs.clear()
                finally:
                    for h in hooks:
                        h.remove()
                del dW
                for l in linears:
                    sch.free(f"dW {l}")
            err = ref = b_err = b_ref = 0.0
            with sch.resident([name], f"block {i} (quantized)", weights=q_weights) as (blk,):
                box = {}
                hook = _keep_output(blk, adapter.o_proj, box)
                try:
                    for i0, i1, x in sch.chunks(store.inputs, plan.chunk):
                        yb = sch.to_host(block_forward(blk, x, kwargs).float())
                        y = sch.to_host(box[OUT].float())
                        err += _sq(y - attn_fp[i0:i1])
                        ref += _sq(attn_fp[i0:i1])
                        y_fp = store.outputs.get(i0, i1).float()
                        b_err += _sq(yb - y_fp)
                        b_ref += _sq(y_fp - sch.to_host(x.float()))
                finally:
                    hook.remove()
            out.append({"block": i, "sq_error": err, "sq_reference": ref, "rel_error": err / ref if ref else 0.0,
                        "block_rel_error": b_err / b_ref if b_ref else 0.0,
                        "layers": {l: (e / r if r else 0.0) for l, (e, r) in lay.items()},
                        "tokens": n * L})
            store.advance()
    store.close()
    return out
