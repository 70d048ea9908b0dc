"""Qwen2 / Qwen2.5: Llama-style blocks with biases on the q/k/v projections."""

from __future__ import annotations

from .llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    family = "Qwen2"
    model_types = ("qwen2",)

    def check_config(self, config) -> None:
        super().check_config(config)
        if getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen2: use_sliding_window=True is not supported")
