"""Model adapters, one file per family, selected from the Hugging Face config's ``model_type``."""

from __future__ import annotations

from .base import AttentionStates, HeadInfo, ModelAdapter
from .llama import LlamaAdapter
from .opt import OPTAdapter
from .qwen2 import Qwen2Adapter
from .qwen3 import Qwen3Adapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (OPTAdapter, LlamaAdapter, Qwen2Adapter, Qwen3Adapter)
SUPPORTED = {t: a for a in ADAPTERS for t in a.model_types}


def supported_text() -> str:
    return ", ".join(f"{a.family} (model_type '{t}')" for a in ADAPTERS for t in a.model_types)


def get_adapter(config) -> ModelAdapter:
    """The adapter for ``config``; an unsupported architecture fails here, before any work."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise ValueError(f"unsupported model: model_type '{model_type}' ({archs}). "
                         f"Supported: {supported_text()}.")
    return SUPPORTED[model_type](config)


__all__ = ["ADAPTERS", "AttentionStates", "HeadInfo", "ModelAdapter", "SUPPORTED", "get_adapter",
           "supported_text"]
