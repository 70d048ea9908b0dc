"""Console output: the plan, per-block progress with ETA and memory, and the final summary.

With ``progress=False`` (tests, logs) the same information is printed as plain lines.
"""

from __future__ import annotations

from contextlib import contextmanager

import psutil
import torch
from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .scheduler.ledger import fmt_bytes


def memory_text(ledger=None) -> str:
    parts = []
    if ledger is not None:
        if ledger.device.type == "cuda":
            parts.append(f"GPU {fmt_bytes(torch.cuda.max_memory_allocated(ledger.device))} peak")
        parts.append(f"ledger {fmt_bytes(ledger.peak)}/{fmt_bytes(ledger.budget)}")
    parts.append(f"RSS {fmt_bytes(psutil.Process().memory_info().rss)}")
    return " · ".join(parts)


class Console:
    def __init__(self, progress: bool = True, rich: RichConsole | None = None):
        self.progress = progress
        import sys
        self.rich = rich or RichConsole(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)

    def note(self, text: str) -> None:
        self.rich.print(f"[yellow]note:[/yellow] {text}" if self.progress else f"note: {text}", soft_wrap=True)

    def error(self, text: str) -> None:
        self.rich.print(f"[red]error:[/red] {text}" if self.progress else f"error: {text}", soft_wrap=True,
                        markup=self.progress)

    def plan(self, prep) -> None:
        h = prep.adapter.heads
        title = (f"{prep.adapter.family} · {prep.adapter.n_blocks} blocks · d={h.hidden_size} · heads {h.n_heads}"
                 f" (KV {h.n_kv_heads}) x {h.head_dim} · {prep.qc.method.upper()} W{prep.qc.wbits} · "
                 f"{prep.qc.nsamples}x{prep.qc.seqlen} tokens · {prep.device} {str(prep.dtype).replace('torch.', '')}")
        self.rich.print(prep.plan.render(title))
        work = ", ".join(f"{k} {v:,.0f}" for k, v in prep.plan.gflop_per_block.items())
        self.rich.print(f"work per block (GFLOP): {work}")

    @contextmanager
    def blocks(self, n: int, done: int):
        if not self.progress:
            yield _PlainProgress(self.rich, n)
            return
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[mem]}"),
                      console=self.rich, transient=False) as p:
            task = p.add_task("blocks", total=n, completed=done, mem=memory_text())
            yield _RichProgress(p, task, n)

    def summary(self, report: dict) -> None:
        t = Table(title="lowmem_boa: quantization summary")
        t.add_column("block", justify="right")
        t.add_column("seconds", justify="right")
        t.add_column("mean rel. layer error", justify="right")
        t.add_column("BoA rel. Kronecker error (q/k/v, MLP in)", justify="right")
        for i, b in sorted(report["blocks"].items(), key=lambda kv: int(kv[0])):
            layers = b.get("layers", [])
            errs = [l["rel_error"] for l in layers if l.get("rel_error") is not None]
            att = [l["rel_attention_error"] for l in layers if l.get("rel_attention_error") is not None]
            t.add_row(str(i), f"{b.get('seconds', 0):.1f}", f"{sum(errs) / len(errs):.4f}" if errs else "–",
                      " / ".join(f"{a:.4f}" for a in att) if att else "–")
        mem = report["memory"]
        t.caption = (f"device peak (ledger) {fmt_bytes(mem['ledger_peak_bytes'])} of {fmt_bytes(mem['budget_bytes'])}"
                     f" · total {report['seconds_total_this_run']:.1f} s this run · output: {report['options']['output']}")
        self.rich.print(t)


class _RichProgress:
    def __init__(self, p, task, n):
        self.p, self.task, self.n = p, task, n

    def update(self, i: int, what: str) -> None:
        self.p.update(self.task, description=f"block {i + 1}/{self.n}: {what}")

    def advance(self, i: int, stats, ledger=None) -> None:
        self.p.update(self.task, advance=1, mem=memory_text(ledger))


class _PlainProgress:
    def __init__(self, console, n):
        self.console, self.n = console, n

    def update(self, i: int, what: str) -> None:
        self.console.print(f"block {i + 1}/{self.n}: {what}")

    def advance(self, i: int, stats, ledger=None) -> None:
        if stats is not None:
            self.console.print(f"block {i + 1}/{self.n} done in {stats['seconds']:.1f} s · {memory_text(ledger)}")
