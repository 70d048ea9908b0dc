"""What a solver returns besides the de-quantized weights: integer codes and grids for export."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .grid import dequantize


@dataclass
class QuantResult:
    """Quantized weights of one linear layer.

    ``Q`` has the shape and dtype of the input ``W``. ``codes`` (``uint8``, same shape) and
    the grids ``scale``/``zero`` (``(d_row, n_groups)`` float32, ``zero`` integer-valued)
    reproduce ``Q`` exactly via :meth:`dequantize`. Column ``c`` belongs to group
    ``c // group_size`` (``group_size=None``: one group per row), in original column order,
    also when act-order was used.
    """

    Q: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    sym: bool
    group_size: int | None
    method: str
    info: dict = field(default_factory=dict)

    @property
    def g_idx(self) -> torch.Tensor:
        C = self.codes.shape[-1]
        gs = self.group_size or C
        return torch.arange(C, device=self.codes.device, dtype=torch.int32) // gs

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.group_size,
                          dtype=self.Q.dtype if dtype is None else dtype)
