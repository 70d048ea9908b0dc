"""lowmem_boa: attention-aware post-training weight quantization (BoA) on small GPUs."""

__version__ = "0.1.0"
