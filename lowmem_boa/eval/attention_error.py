"""Per-block attention-module output error of a quantized model against its original.

For every block ``i`` the inputs ``X_i`` are the *original* model's block inputs on held-out
windows, so each block is judged on its own: ``sum ||MHA_q(X_i) - MHA_fp(X_i)||^2`` over all tokens,
where ``MHA`` is the attention module's output (after the out-projection, before the residual),
relative to ``sum ||MHA_fp(X_i)||^2``. This is the quantity BoA's attention-aware Hessians target.
Streams one block at a time like everything else.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..forward import block_forward, capture_output, first_block_inputs
from ..models import get_adapter
from ..scheduler import ActivationStore, Ledger, Scheduler, build_skeleton, load_config, open_checkpoint
from ..scheduler.planner import make_eval_plan


def attention_output_errors(fp_dir: str | Path, q_dir: str | Path, windows: torch.Tensor, device: torch.device,
                            budget: int, dtype: torch.dtype = torch.float32) -> list[dict]:
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
    out = []
    with torch.inference_mode():
        kwargs = first_block_inputs(sch, model, adapter, windows, store, plan.chunk)
        for i in range(adapter.n_blocks):
            name = adapter.block_name(i)
            with sch.resident([name], f"block {i} (original)") as (blk,):
                for i0, i1, x in sch.chunks(store.inputs, plan.chunk):
                    attn_fp[i0:i1] = sch.to_host(capture_output(blk, adapter.o_proj, x, kwargs).float())
                    sch.store(store.outputs, i0, i1, block_forward(blk, x, kwargs))
            q_weights = {f"{name}.{k}": q_reader.get(q_reader.resolve(f"{name}.{k}", prefix))
                         for k, _ in model.get_submodule(name).named_parameters()}
            err = ref = 0.0
            with sch.resident([name], f"block {i} (quantized)", weights=q_weights) as (blk,):
                for i0, i1, x in sch.chunks(store.inputs, plan.chunk):
                    y = sch.to_host(capture_output(blk, adapter.o_proj, x, kwargs).float())
                    err += float((y - attn_fp[i0:i1]).double().pow(2).sum())
                    ref += float(attn_fp[i0:i1].double().pow(2).sum())
            out.append({"block": i, "sq_error": err, "sq_reference": ref, "rel_error": err / ref if ref else 0.0,
                        "tokens": n * L})
            store.advance()
    store.close()
    return out
