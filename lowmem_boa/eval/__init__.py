"""Evaluation: streaming perplexity and the per-block attention-output error."""

from .attention_error import attention_output_errors
from .perplexity import streaming_nll

__all__ = ["attention_output_errors", "streaming_nll"]
