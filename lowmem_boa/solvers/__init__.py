"""Pure-tensor quantization solvers: RTN, GPTQ and BoA (no model code in here).

Public API (shapes and meanings are stable; external checks use them):

* ``rtn(W, bits, sym=False, grid="minmax", group_size=None) -> Q``
* ``gptq(W, H_col, bits, sym=False, grid="hessian", group_size=None, act_order=False,
  block_size=128, percdamp=0.01) -> Q``
* ``boa(W, H_col, H_row, n_heads, bits, sym=False, grid="hessian", act_order_col=False,
  act_order_row=False, percdamp=0.01) -> Q``

The ``*_quantize`` variants take the same arguments and return a :class:`QuantResult` with
the integer codes and per-row/per-group grids as well. ``find_params`` is the grid search.
"""

from .boa_solver import boa, boa_quantize
from .gptq_solver import gptq, gptq_quantize
from .grid import dequantize, fake_quantize, find_params, grid_error, quantize_codes
from .hessian import upper_cholesky_of_inverse
from .objective import attention_loss, layer_loss
from .reference import boa_reference, gptq_reference
from .result import QuantResult
from .rtn_solver import rtn, rtn_quantize
from .validation import GRIDS

__all__ = [
    "GRIDS", "QuantResult", "attention_loss", "boa", "boa_quantize", "boa_reference", "dequantize",
    "fake_quantize", "find_params", "gptq", "gptq_quantize", "gptq_reference", "grid_error",
    "layer_loss", "quantize_codes", "rtn", "rtn_quantize", "upper_cholesky_of_inverse",
]
