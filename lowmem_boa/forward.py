"""Running parts of a model: one block, a block up to one of its layers, the embedding stage.

Shared by quantization (statistics, propagation) and evaluation.
"""

from __future__ import annotations

import torch

from .scheduler.planner import PHASE_EMBED, Plan, workspace_bytes
from .scheduler.scheduler import Scheduler
from .scheduler.store import ActivationStore


class _Stop(Exception):
    pass


def _capture(block: torch.nn.Module, layer: str, x: torch.Tensor, kwargs: dict, output: bool) -> torch.Tensor:
    """Run ``block`` on ``x`` until its submodule ``layer`` is called (or has returned, with
    ``output``) and stop there; return that call's first input (or its output)."""
    box = {}

    def pre_hook(module, args):
        box["t"] = args[0]
        raise _Stop

    def post_hook(module, args, out):
        box["t"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    module = block.get_submodule(layer)
    handle = module.register_forward_hook(post_hook) if output else module.register_forward_pre_hook(pre_hook)
    try:
        block(x, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "t" not in box:
        raise RuntimeError(f"the block never called {layer}")
    return box["t"]


def capture_input(block: torch.nn.Module, layer: str, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The input of ``block.<layer>`` when the block runs on ``x`` (the rest is not computed)."""
    return _capture(block, layer, x, kwargs, output=False)


def capture_output(block: torch.nn.Module, layer: str, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The output of ``block.<layer>`` when the block runs on ``x`` (the rest is not computed)."""
    return _capture(block, layer, x, kwargs, output=True)


def capture_inputs(block: torch.nn.Module, layers: list[str], x: torch.Tensor, kwargs: dict,
                   full: bool = False) -> tuple[dict, torch.Tensor | None]:
    """One run of ``block`` on ``x`` that records the first input of each of ``layers``: the
    same tensors ``capture_input`` returns one layer at a time. Without ``full`` the block stops
    once all of them are recorded (output ``None``); with ``full`` it runs to the end and its
    output is returned as well."""
    box: dict = {}

    def hook_for(name):
        def pre_hook(module, args):
            box.setdefault(name, args[0])
            if not full and len(box) == len(layers):
                raise _Stop
        return pre_hook

    handles = [block.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in layers]
    out = None
    try:
        out = block_forward(block, x, kwargs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in box]
    if missing:
        raise RuntimeError(f"the block never called {', '.join(missing)}")
    return box, out


def block_forward(block: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def container_and_blocks(model, adapter):
    container_name, list_name = adapter.blocks_prefix.rsplit(".", 1)
    return container_name, list_name, model.get_submodule(container_name)


def embedding_modules(model, adapter) -> list[str]:
    """Modules run before block 0: the blocks' container's other children (embeddings,
    positions, rotary frequencies, input projection); never the LM head."""
    container_name, list_name, container = container_and_blocks(model, adapter)
    return [f"{container_name}.{n}" for n, _ in container.named_children() if n != list_name]


class _Catch(Exception):
    pass


class _Catcher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.kwargs = None, None

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden, self.kwargs = hidden_states, kwargs
        raise _Catch


def first_block_inputs(sch: Scheduler, model, adapter, ids: torch.Tensor, store: ActivationStore | None,
                       chunk: int, plan: Plan | None = None) -> dict:
    """Embed ``ids`` chunk by chunk into ``store.inputs``; return the block kwargs (on device)."""
    container_name, list_name, container = container_and_blocks(model, adapter)
    blocks = getattr(container, list_name)
    original = blocks[0]
    catcher = _Catcher()
    blocks[0] = catcher
    kwargs = None
    ws = workspace_bytes(plan.phase(PHASE_EMBED)) if plan is not None else 0
    try:
        with sch.ledger.phase(PHASE_EMBED), sch.workspace("workspace: embed", ws), \
                sch.resident(embedding_modules(model, adapter), "embedding weights"):
            for i0 in range(0, ids.shape[0], chunk):
                i1 = min(i0 + chunk, ids.shape[0])
                x = sch.to_device(ids[i0:i1], "ids chunk")
                try:
                    model(input_ids=x, use_cache=False)
                except _Catch:
                    pass
                sch.free("ids chunk")
                if store is not None:
                    sch.store(store.inputs, i0, i1, catcher.hidden)
                    if store.fp_stream:    # before block 0 both models compute the same
                        sch.store(store.fp_inputs, i0, i1, catcher.hidden)
                if kwargs is None:
                    kwargs = {k: v for k, v in catcher.kwargs.items()
                              if k not in ("past_key_values", "use_cache", "cache_position")}
    finally:
        blocks[0] = original
    kwargs["use_cache"] = False
    return kwargs

