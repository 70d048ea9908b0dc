"""Checkpoint/resume state of a run and the exported Hugging Face checkpoint."""

from .export_hf import export_fake_quant, write_checkpoint
from .state import RunState, StateError, atomic_save_safetensors, atomic_write_bytes, sha256_file

__all__ = ["RunState", "StateError", "atomic_save_safetensors", "atomic_write_bytes", "export_fake_quant",
           "sha256_file", "write_checkpoint"]
