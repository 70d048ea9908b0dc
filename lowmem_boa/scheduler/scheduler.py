"""The scheduler: the only code that moves tensors between disk, host and compute device.

* Weights: a block's parameters are read lazily from the checkpoint's safetensors (or from a
  finished block file) straight into the meta skeleton on the device, and dropped back to
  meta afterwards. Nothing else of the model is resident.
* Activations: live on the host (:class:`ActivationStore`, RAM or disk memmap) and visit the
  device one chunk of samples at a time.
* Statistics: float32 accumulators live on the host unless the plan keeps them on the device;
  each chunk's partial sum is computed on the device and added where the accumulator lives.

Every placement on the device is reserved in the :class:`Ledger` first, which refuses anything
over the budget.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate.utils import set_module_tensor_to_device

from .ledger import Ledger, tensor_bytes
from .loader import CheckpointReader
from .store import ActivationSlot


def _param_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in module.parameters())


class Scheduler:
    def __init__(self, model: torch.nn.Module, reader: CheckpointReader | None, device: torch.device,
                 ledger: Ledger, dtype: torch.dtype, hessians_on_device: bool = False):
        self.model = model
        self.reader = reader
        self.device = device
        self.ledger = ledger
        self.dtype = dtype
        self.hessians_on_device = hessians_on_device
        self.prefix = getattr(model, "base_model_prefix", "model")

    # ----- weights ----------------------------------------------------------------------
    def _fill(self, module_name: str, weights: dict[str, torch.Tensor] | None) -> None:
        """Materialise every parameter under ``module_name`` on the device."""
        module = self.model.get_submodule(module_name)
        for pname, p in list(module.named_parameters()):
            full = f"{module_name}.{pname}" if module_name else pname
            if weights is not None and pname in weights:
                value = weights[pname]
            else:
                if self.reader is None:
                    raise KeyError(f"no weights for {full}")
                key = self.reader.resolve(full, self.prefix)
                if key is None:
                    raise KeyError(f"{full} is missing from the checkpoint")
                value = self.reader.get(key)
            dtype = self.dtype if value.is_floating_point() else value.dtype
            set_module_tensor_to_device(module, pname, self.device, value=value.to(dtype))
        for bname, b in list(module.named_buffers()):
            if b.device != self.device and b.device.type != "meta":
                set_module_tensor_to_device(module, bname, self.device, value=b)

    def _drop(self, module_name: str) -> None:
        module = self.model.get_submodule(module_name)
        for pname, _ in list(module.named_parameters()):
            set_module_tensor_to_device(module, pname, "meta")

    @contextmanager
    def resident(self, module_names: list[str], tag: str, weights: dict | None = None):
        """Modules materialised on the device for the duration of the context."""
        nbytes = sum(_param_bytes(self.model.get_submodule(n), self.dtype) for n in module_names)
        self.ledger.reserve(tag, nbytes)
        try:
            for n in module_names:
                sub = None if weights is None else {k[len(n) + 1:]: v for k, v in weights.items()
                                                    if k.startswith(n + ".")}
                self._fill(n, sub)
            if self.reader is not None and hasattr(self.reader, "close"):
                self.reader.close()    # unmap what was read: only the placed copies stay resident
            yield [self.model.get_submodule(n) for n in module_names]
        finally:
            for n in module_names:
                self._drop(n)
            self.ledger.release(tag)

    def host_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A module's parameters copied to the host (to save a finished block)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    # ----- activations ------------------------------------------------------------------
    def chunks(self, slot: ActivationSlot, chunk: int, tag: str = "activation chunk"):
        """Yield ``(i0, i1, x)`` with ``x`` the samples ``i0:i1`` of ``slot`` on the device."""
        n = slot.shape[0]
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            host = slot.get(i0, i1)
            with self.ledger.reserving(tag, tensor_bytes(host)):
                yield i0, i1, host.to(self.device, non_blocking=False)

    def store(self, slot: ActivationSlot, i0: int, i1: int, value: torch.Tensor) -> None:
        slot.put(i0, i1, value.to("cpu"))

    def to_device(self, t: torch.Tensor, tag: str) -> torch.Tensor:
        """A copy of ``t`` on the compute device, accounted under ``tag`` until :meth:`free`.

        Always a copy, also when the device is the CPU: callers may modify it in place (the
        solvers damp their Hessians in place) and must get the same result on every device.
        """
        self.ledger.reserve(tag, tensor_bytes(t))
        return t.to(self.device, copy=True)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu")

    def free(self, tag: str) -> None:
        self.ledger.release(tag)

    @contextmanager
    def workspace(self, tag: str, nbytes: int):
        """Account device memory a computation allocates itself (attention maps, solver)."""
        with self.ledger.reserving(tag, nbytes):
            yield

    # ----- statistics ---------------------------------------------------------------------
    def accumulator(self, tag: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 zero accumulator, on the device if the plan keeps Hessians there."""
        if self.hessians_on_device:
            self.ledger.reserve(tag, 4 * _numel(shape))
            return torch.zeros(shape, dtype=torch.float32, device=self.device)
        return torch.zeros(shape, dtype=torch.float32)

    def device_zeros(self, tag: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 zero tensor on the device (always), reserved under ``tag``."""
        self.ledger.reserve(tag, 4 * _numel(shape))
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def accumulate(self, acc: torch.Tensor, partial: torch.Tensor) -> None:
        acc += partial if partial.device == acc.device else partial.to(acc.device)

    def settle(self, tag: str, acc: torch.Tensor) -> torch.Tensor:
        """A finished accumulator, moved to the host (freeing its device reservation)."""
        if acc.device.type != "cpu":
            acc = acc.to("cpu")
        self.ledger.release(tag)   # also on a CPU device: from here it is a host-held Hessian (host plan)
        return acc


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
