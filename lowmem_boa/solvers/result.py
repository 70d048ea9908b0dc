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
    # llama.cpp k-quant grids (solvers.kquant): {"type", "sc", "m", "d", "dmin"} -- the stored fields;
    # ``scale``/``zero`` are then per sub-block (``group_size`` = its columns) and, for the
    # asymmetric types, ``zero`` is the real offset m of ``w = s q - m``
    kquant: dict | None = None

    @property
    def g_idx(self) -> torch.Tensor:
        C = self.codes.shape[-1]
        gs = self.group_size or C
        return torch.arange(C, device=self.codes.device, dtype=torch.int32) // gs

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.kquant is not None:
            from .kquant import dequantize as kdequant, ktype
            kt = ktype(self.kquant["type"])
            s = self.scale.repeat_interleave(kt.sub, dim=-1)
            z = self.zero.repeat_interleave(kt.sub, dim=-1)
            return kdequant(self.codes.float(), s, z, kt).to(self.Q.dtype if dtype is None else dtype)
        return dequantize(self.codes, self.scale, self.zero, self.group_size,
                          dtype=self.Q.dtype if dtype is None else dtype)
