"""Streaming perplexity of a Hugging Face checkpoint (fp or fake-quantized), GPTQ protocol.

The test text is tokenized once and cut into non-overlapping ``seqlen`` windows; all windows go
through the model one block at a time (weights streamed from the checkpoint under the device
budget, activations on the host), then the final norm and LM head give the mean token NLL over
every predicted position (positions 1..L-1 of each window). ``ppl = exp(mean NLL)``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..forward import block_forward, first_block_inputs
from ..models import get_adapter
from ..scheduler import ActivationStore, Ledger, Scheduler, build_skeleton, load_config, open_checkpoint
from ..scheduler.planner import PHASE_HEAD, PHASE_PROPAGATE, make_eval_plan, workspace_bytes


def streaming_nll(model_dir: str | Path, windows: torch.Tensor, device: torch.device, budget: int,
                  dtype: torch.dtype = torch.float32, progress=None) -> dict:
    """Mean next-token NLL of ``windows`` (``(n, L)`` ids) under the model in ``model_dir``."""
    t0 = time.perf_counter()
    config = load_config(str(model_dir))
    adapter = get_adapter(config)
    reader = open_checkpoint(model_dir)
    model = build_skeleton(config, dtype)
    n, L = windows.shape
    plan = make_eval_plan(adapter, n, L, torch.empty((), dtype=dtype).element_size(), budget)
    ledger = Ledger(device, budget)
    sch = Scheduler(model, reader, device, ledger, dtype)
    store = ActivationStore(n, L, adapter.heads.hidden_size, dtype)
    with torch.inference_mode():
        kwargs = first_block_inputs(sch, model, adapter, windows, store, plan.chunk)
        for i in range(adapter.n_blocks):
            if progress is not None:
                progress(i, adapter.n_blocks)
            forward_ws = workspace_bytes(plan.phase(PHASE_PROPAGATE))
            with ledger.phase(PHASE_PROPAGATE), sch.workspace("workspace: forward", forward_ws), \
                    sch.resident([adapter.block_name(i)], f"block {i}") as (blk,):
                for i0, i1, x in sch.chunks(store.inputs, plan.chunk):
                    sch.store(store.outputs, i0, i1, block_forward(blk, x, kwargs))
            store.advance()
        head = adapter.head_modules(model)
        prefix = getattr(model, "base_model_prefix", "model")
        out_name = _module_name(model, model.get_output_embeddings())
        # tied checkpoints store no LM head: the input embedding is the output projection
        has_head = reader.resolve(out_name + ".weight", prefix) is not None
        weight_module = out_name if has_head else _module_name(model, model.get_input_embeddings())
        total_nll, total_tok = 0.0, 0
        with ledger.phase(PHASE_HEAD), sch.workspace("workspace: head", workspace_bytes(plan.phase(PHASE_HEAD))), \
                sch.resident(head + [weight_module], "LM head"):
            lin = model.get_submodule(weight_module)
            lm_weight, lm_bias = lin.weight, (getattr(lin, "bias", None) if has_head else None)
            for i0, i1, x in sch.chunks(store.inputs, plan.chunk):
                for m in head:
                    x = model.get_submodule(m)(x)
                labels = sch.to_device(windows[i0:i1], "labels")
                for s0 in range(0, L - 1, plan.head_tokens):
                    s1 = min(s0 + plan.head_tokens, L - 1)
                    logits = torch.nn.functional.linear(x[:, s0:s1], lm_weight, lm_bias).float()
                    logp = torch.log_softmax(logits, dim=-1)
                    tgt = labels[:, s0 + 1:s1 + 1]
                    total_nll -= float(logp.gather(-1, tgt.unsqueeze(-1)).sum())
                    total_tok += tgt.numel()
                sch.free("labels")
    store.close()
    nll = total_nll / total_tok
    return {"nll": nll, "ppl": math.exp(nll), "tokens": total_tok, "windows": n, "seqlen": L,
            "seconds": time.perf_counter() - t0, "memory": ledger.report(),
            "plan": {"chunk": plan.chunk, "head_tokens": plan.head_tokens, "predicted_peak_bytes": plan.peak}}


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
