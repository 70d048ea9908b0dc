"""Host-side storage of the calibration activations between blocks: RAM or a disk memmap.

Two slots of ``(N, L, d)`` (a block's inputs and its outputs) are swapped after every block; with
``fp_stream`` (``--fp-targets``) two more hold the full-precision model's own activations.
With ``on_disk`` each slot is a raw file in the work directory mapped with numpy; chunks read
from it are views into the page cache, so host RAM holds only the chunks in flight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_NP_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


class ActivationSlot:
    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, path: Path | None = None):
        self.shape, self.dtype, self.path = shape, dtype, path
        if path is None:
            self._data = torch.empty(shape, dtype=dtype)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            mm = np.memmap(path, dtype=_NP_STORAGE[dtype], mode="w+", shape=shape)
            t = torch.from_numpy(mm)
            self._data = t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
            self._mm = mm

    def get(self, i0: int, i1: int) -> torch.Tensor:
        return self._data[i0:i1]

    def put(self, i0: int, i1: int, value: torch.Tensor) -> None:
        self._data[i0:i1].copy_(value)

    def close(self) -> None:
        self._data = None
        if self.path is not None:
            self._mm = None
            self.path.unlink(missing_ok=True)


class ActivationStore:
    """Inputs of the current block and outputs it produces, swapped by :meth:`advance`."""

    def __init__(self, nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype,
                 work_dir: Path | None = None, on_disk: bool = False, fp_stream: bool = False):
        shape = (nsamples, seqlen, hidden)
        self.nsamples = nsamples
        self.on_disk = on_disk
        mk = (lambda name: work_dir / name) if on_disk else (lambda name: None)
        self.inputs = ActivationSlot(shape, dtype, mk("activations_a.bin"))
        self.outputs = ActivationSlot(shape, dtype, mk("activations_b.bin"))
        self.fp_inputs = ActivationSlot(shape, dtype, mk("activations_fp_a.bin")) if fp_stream else None
        self.fp_outputs = ActivationSlot(shape, dtype, mk("activations_fp_b.bin")) if fp_stream else None

    @property
    def fp_stream(self) -> bool:
        return self.fp_inputs is not None

    def advance(self) -> None:
        self.inputs, self.outputs = self.outputs, self.inputs
        if self.fp_stream:
            self.fp_inputs, self.fp_outputs = self.fp_outputs, self.fp_inputs

    def close(self) -> None:
        for slot in (self.inputs, self.outputs, self.fp_inputs, self.fp_outputs):
            if slot is not None:
                slot.close()
