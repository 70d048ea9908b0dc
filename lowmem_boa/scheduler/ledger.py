"""Memory sizes and the device-memory ledger.

The ledger accounts every tensor the scheduler places on the compute device (block weights,
activation chunks, attention chunks, Hessian accumulators, solver workspace) as named
reservations. A reservation that would exceed the budget raises ``BudgetExceeded`` instead of
allocating. On CUDA the allocator's own peak (``torch.cuda.max_memory_allocated``) is recorded
per phase next to the ledger's; on a CPU-only machine the ledger's accounting is the measure.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text) -> int:
    """``"14GiB"``, ``"500MB"``, ``"1.5g"``, ``1024`` -> bytes. GB = 10^9, GiB = 2^30."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"memory size must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {text!r}; use e.g. 14GiB, 500MB, 2.5GB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class BudgetExceeded(RuntimeError):
    pass


@dataclass
class PhaseRecord:
    name: str
    ledger_peak: int = 0
    device_peak: int | None = None   # torch.cuda.max_memory_allocated during the phase (CUDA)
    planned: int | None = None


@dataclass
class Ledger:
    device: torch.device
    budget: int
    live: dict = field(default_factory=dict)
    current: int = 0
    peak: int = 0
    phases: dict = field(default_factory=dict)
    _phase: PhaseRecord | None = None

    def reserve(self, tag: str, nbytes: int) -> None:
        nbytes = int(nbytes)
        if self.current + nbytes > self.budget:
            raise BudgetExceeded(
                f"placing '{tag}' ({fmt_bytes(nbytes)}) on {self.device} would use "
                f"{fmt_bytes(self.current + nbytes)} > budget {fmt_bytes(self.budget)}; live: "
                + ", ".join(f"{k}={fmt_bytes(v)}" for k, v in self.live.items()))
        self.live[tag] = self.live.get(tag, 0) + nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        if self._phase is not None:
            self._phase.ledger_peak = max(self._phase.ledger_peak, self.current)

    def release(self, tag: str) -> None:
        self.current -= self.live.pop(tag, 0)

    def holds(self, tag: str) -> bool:
        return tag in self.live

    @contextmanager
    def reserving(self, tag: str, nbytes: int):
        self.reserve(tag, nbytes)
        try:
            yield
        finally:
            self.release(tag)

    @contextmanager
    def phase(self, name: str, planned: int | None = None):
        """Record the ledger peak (and on CUDA the allocator peak) of a pipeline phase."""
        rec = self.phases.get(name) or PhaseRecord(name=name, planned=planned)
        self.phases[name] = rec
        outer, self._phase = self._phase, rec
        rec.ledger_peak = max(rec.ledger_peak, self.current)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield rec
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                rec.device_peak = max(rec.device_peak or 0, peak)
            self._phase = outer

    def report(self) -> dict:
        return {
            "device": str(self.device), "budget_bytes": self.budget, "ledger_peak_bytes": self.peak,
            "phases": {k: {"ledger_peak_bytes": v.ledger_peak, "device_peak_bytes": v.device_peak,
                           "planned_bytes": v.planned} for k, v in self.phases.items()},
        }


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
