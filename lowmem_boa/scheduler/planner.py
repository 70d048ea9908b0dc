"""Memory model and plan of a streaming quantization run, from the model config alone.

Every phase of the pipeline has a predicted peak on the compute device, written as a sum of
named terms (see docs/memory.md for the formulas). The planner picks the largest chunk sizes
whose peaks fit the budget, decides whether the float32 Hessian accumulators can stay on the
device, and refuses with a clear message when even the smallest plan does not fit.

Symbols: ``d`` hidden size, ``H``/``Hkv`` query/KV heads, ``dh`` head size, ``I`` MLP size,
``V`` vocabulary, ``L`` sequence length, ``N`` calibration samples, ``c`` samples per chunk,
``b`` bytes per weight/activation element (2 for fp16/bf16), 4 bytes for float32 statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.base import ModelAdapter
from ..stats.attention_stats import block_v_row_chunk
from .ledger import fmt_bytes

F32 = 4
SAFETY = 0.90          # use at most this fraction of a budget for predicted peaks
CPU_FIXED = 1 << 30    # Python, torch, tokenizer and the model skeleton on the host
# On a CPU device without --max-gpu-mem the budget (80 % of free RAM) is a ceiling, not a target:
# chunks stop growing at this many tokens, where CPU matmuls are already at full speed
# (docs/memory.md, "Lean footprint"); larger chunks only cost RAM.
CPU_CHUNK_TOKENS = 1024


PHASE_EMBED = "embed (first block inputs)"
PHASE_ATTN = "attention statistics"
PHASE_BLOCK_V = "block_v statistics"
PHASE_OUT = "out-proj statistics"
PHASE_MLP_IN = "MLP-input statistics"
PHASE_MLP_OUT = "MLP-output statistics"
PHASE_STATS = "block statistics (one forward)"   # one pass (default): all four groups above at once
PHASE_PROPAGATE = "propagate (block forward)"
PHASE_FP_PROPAGATE = "fp stream (full-precision block forward)"
PHASE_SOLVE = "solve (per layer)"
# terms the scheduler reserves itself when it places the tensors; the rest of a phase's
# terms is workspace the computation allocates, reserved as one amount
PLACED_TERMS = {"block weights", "input chunk", "input + output chunk", "embedding weights",
                "H accumulator", "per-head H_col accumulator", "H_col (handed over)"}


def workspace_bytes(phase: "Phase") -> int:
    return int(sum(v for k, v in phase.terms.items() if k not in PLACED_TERMS))


class PlanError(ValueError):
    """The run cannot fit the given budgets; raised before any work."""


@dataclass(frozen=True)
class PlanInputs:
    method: str              # boa | gptq | rtn
    calibration: bool        # statistics and propagation needed (all but RTN with a data-free grid)
    nsamples: int
    seqlen: int
    dtype_bytes: int
    block_v: bool = True           # the pipeline passes QuantConfig.block_v (off at 2 bits); True here: the
                                   # planner's own tests and benchmarks plan the largest BoA configuration
    group_size: int | None = None
    device_type: str = "cuda"
    true_sequential: bool = False  # False: all of a block's Hessians are held at once
    search_orders: bool = False    # every act-order combination per layer: extra solver copies
    qparam: str = "hessian"        # grid search (only changes the arithmetic count)
    grid_coarse: int = 1           # coarse-to-fine grid search (fewer candidates; arithmetic only)
    refine_scales: int = 0         # scale refinement sweeps (arithmetic only)
    max_chunk_tokens: int | None = None   # cap on samples x seqlen per chunk (CPU default: CPU_CHUNK_TOKENS)
    wbits: int = 2                 # for the disk plan (packed codes)
    fake_quant: bool = True        # the fake-quantized checkpoint is written (disk plan)
    exports: tuple = ()            # --export formats (disk plan)
    fp_targets: bool = False       # a second (full-precision) activation stream and C = X_fp X~^T per H
    fp_bound: bool = False         # --fp-max-shift: a layer whose correction exceeds it is solved twice
    mlp_row_group: int | None = None   # BoA --mlp-row-hessian: rows per block of the MLP-input row Hessian
    block_v_targets: bool = False  # BoA --block-v-targets: V's per-head C from the fp stream's attention too


@dataclass
class Phase:
    name: str
    terms: dict              # term -> bytes
    note: str = ""

    @property
    def total(self) -> int:
        return int(sum(self.terms.values()))


@dataclass
class Plan:
    inputs: PlanInputs
    budget: int
    cpu_budget: int | None
    chunk: int                          # samples per forward chunk
    attn_chunk: int                     # samples per block_v attention chunk
    attn_heads: int                     # query heads per block_v attention chunk
    hessians_on_device: bool
    activations_on_disk: bool
    phases: list[Phase] = field(default_factory=list)
    cpu_terms: dict = field(default_factory=dict)
    gflop_per_block: dict = field(default_factory=dict)
    host_by_phase: dict = field(default_factory=dict)  # host bytes planned during each phase (cpu_terms' peak is the max)
    disk_terms: dict = field(default_factory=dict)   # bytes on disk by item (see disk_plan)
    disk_peak: int = 0                               # the largest amount on disk at one time

    @property
    def peak(self) -> int:
        return max(p.total for p in self.phases)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    @property
    def cpu_total(self) -> int:
        return int(sum(self.cpu_terms.values()))

    def as_dict(self) -> dict:
        return {
            "budget_bytes": self.budget, "cpu_budget_bytes": self.cpu_budget, "chunk": self.chunk,
            "attn_chunk": self.attn_chunk, "attn_heads": self.attn_heads,
            "hessians_on_device": self.hessians_on_device, "activations_on_disk": self.activations_on_disk,
            "predicted_peak_bytes": self.peak, "peak_phase": self.peak_phase.name,
            "phases": {p.name: {"total_bytes": p.total, "terms": p.terms, "note": p.note} for p in self.phases},
            "cpu_terms": self.cpu_terms, "cpu_total_bytes": self.cpu_total,
            "gflop_per_block": self.gflop_per_block, "host_by_phase": self.host_by_phase,
            "disk_terms": self.disk_terms, "disk_peak_bytes": self.disk_peak,
        }

    def render(self, title: str = "Plan"):
        """A rich renderable: one row per phase, largest term first."""
        from rich.table import Table
        t = Table(title=title, show_lines=False)
        t.add_column("phase")
        t.add_column("predicted peak", justify="right")
        t.add_column("largest terms")
        for p in self.phases:
            top = sorted(p.terms.items(), key=lambda kv: -kv[1])[:3]
            mark = " [bold](peak)[/bold]" if p is self.peak_phase else ""
            t.add_row(p.name + mark, fmt_bytes(p.total), ", ".join(f"{k} {fmt_bytes(v)}" for k, v in top))
        t.caption = (f"device budget {fmt_bytes(self.budget)} · chunk {self.chunk} samples · "
                     f"block_v chunk {self.attn_chunk} samples x {self.attn_heads} heads · Hessians on "
                     f"{'device' if self.hessians_on_device else 'CPU'} · activations "
                     f"{'on disk (memmap)' if self.activations_on_disk else 'in RAM'} · host "
                     f"{fmt_bytes(self.cpu_total)}" + (f" of {fmt_bytes(self.cpu_budget)}" if self.cpu_budget else "")
                     + f" · disk peak {fmt_bytes(self.disk_peak)} ("
                     + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.disk_terms.items() if v) + ")")
        return t


@dataclass(frozen=True)
class Dims:
    d: int
    H: int
    Hkv: int
    dh: int
    I: int
    V: int
    n_blocks: int
    n_mlp_in: int
    block_params: int
    embed_params: int
    head_params: int
    linear_shapes: dict

    @classmethod
    def from_adapter(cls, adapter: ModelAdapter) -> "Dims":
        h, c = adapter.heads, adapter.config
        shapes = adapter.linear_shapes()
        d, I = h.hidden_size, adapter.intermediate_size
        V = int(c.vocab_size)
        linear = sum(o * i for o, i in shapes.values())
        biases = sum(o for o, _ in shapes.values())
        block = linear + biases + 4 * d                       # + norms (upper bound)
        embed = V * d + (int(getattr(c, "max_position_embeddings", 0)) + 2) * d * (adapter.family == "OPT")
        head = 0 if getattr(c, "tie_word_embeddings", False) else V * d
        return cls(d=d, H=h.n_heads, Hkv=h.n_kv_heads, dh=h.head_dim, I=I, V=V, n_blocks=adapter.n_blocks,
                   n_mlp_in=len(adapter.mlp_in), block_params=block, embed_params=embed, head_params=head,
                   linear_shapes=shapes)


def solver_workspace(rows: int, cols: int, n_col_hessians: int, dtype_bytes: int, search_orders: bool = False,
                     row_hessian_bytes: int = 0) -> dict:
    """Device bytes of one ``gptq``/``boa`` call on a ``rows x cols`` weight (float32 solve).

    Hessians handed over (no copy), their ``U`` factors, Cholesky temporaries for one head,
    the float32 weight copy, the Hessian-grid search temporaries, sweep outputs and the
    un-permuted result; with ``search_orders`` (more than one try of the layer: the act-order
    combinations of ``--search-orders``, the bounded target of ``--fp-max-shift``) also the pristine
    Hessians the solver copies (``row_hessian_bytes`` for BoA's H_row) and the best result kept
    across the tries.
    """
    rc = rows * cols
    extra = {}
    if search_orders:
        extra["several tries: Hessian copies + best result"] = (n_col_hessians * cols * cols * F32
                                                                 + row_hessian_bytes + 2 * rc * F32)
    return {**extra,
        "H_col (handed over)": n_col_hessians * cols * cols * F32,
        "U_col": n_col_hessians * cols * cols * F32,
        "Cholesky temporaries": 3 * cols * cols * F32,
        "weight fp32 + sweep outputs": 4 * rc * F32,
        "grid search temporaries": 3 * rc * F32,
        "result": rc * (dtype_bytes + 1),
    }


def fp_target_workspace(rows: int, cols: int) -> int:
    """Device bytes of ``solvers.target.fp_target_weight`` on a ``rows x cols`` weight, besides H and
    C placed by the scheduler: the damped copy of H, its Cholesky factor, ``C - H``, ``W (C - H)`` and
    its solution, the float32 weight and the result."""
    return 3 * cols * cols * F32 + 4 * rows * cols * F32


def _attention_forward(c: int, L: int, D: Dims, b: int) -> int:
    """HF attention of a chunk, assuming the math (materialised) attention kernel."""
    qkv = c * L * (D.H + 2 * D.Hkv) * D.dh * b * 2     # projections + rotated copies
    scores = c * D.H * L * L * (F32 + b)               # logits + probabilities
    return qkv + scores + c * L * D.H * D.dh * b


def build_phases(D: Dims, inp: PlanInputs, c: int, ca: int, g: int, hess_dev: bool) -> list[Phase]:
    L, b = inp.seqlen, inp.dtype_bytes
    act = c * L * D.d * b
    blk = D.block_params * b
    phases = []
    phases.append(Phase(PHASE_EMBED, {
        "embedding weights": D.embed_params * b, "ids": c * L * 8, "embeddings out": 2 * act}))
    if not inp.calibration:
        big = max(D.linear_shapes.values(), key=lambda s: s[0] * s[1])
        phases.append(Phase(PHASE_SOLVE, {"block weights": blk, **solver_workspace(*big, 1, b)},
                            "RTN: grid search only"))
        return phases

    gram = lambda n: n * n * F32  # noqa: E731
    acc = lambda n: gram(n) if hess_dev else 0  # noqa: E731
    x32 = c * L * D.d * F32
    fp = inp.fp_targets

    def with_fp(terms: dict, n: int, captured: int) -> dict:
        """--fp-targets: the fp stream's chunk, its captured layer input and C's partial sum."""
        if fp:
            terms.update({"fp-stream input chunk": act, "fp-stream layer input": captured,
                          "C partial": gram(n), "C accumulator": acc(n)})
        return terms
    if not one_pass(inp):
        phases.append(Phase(PHASE_ATTN, with_fp({
            "block weights": blk, "input chunk": act, "attention input": act + x32,
            "q/k/v (float32, rotated)": c * L * (D.H + 2 * D.Hkv) * D.dh * F32 * 2,
            "H partial": gram(D.d) + 2 * D.Hkv * D.dh * D.dh * F32,
            "H accumulator": acc(D.d) + (2 * D.Hkv * D.dh * D.dh * F32 if hess_dev else 0)}, D.d, act + x32)))
    if inp.method == "boa" and inp.block_v:
        kv = max(1, g // (D.H // D.Hkv))
        streams = 2 if inp.block_v_targets else 1   # --block-v-targets: the fp stream's maps and C as well
        phases.append(Phase(PHASE_BLOCK_V, {
            "block weights": blk, "input chunk": streams * ca * L * D.d * b,
            "attention input": streams * ca * L * D.d * (b + F32),
            "q/k (float32, rotated)": streams * ca * L * (D.H + D.Hkv) * D.dh * F32 * 2,
            "attention logits + probabilities": streams * 2 * ca * g * L * L * F32,
            "A X (float32)": streams * ca * g * L * D.d * F32,
            "per-head H_col partial": streams * kv * gram(D.d),
            "per-head H_col accumulator": streams * kv * gram(D.d)},
            f"{g} query heads x {ca} samples per step"))
    attn_fwd = _attention_forward(c, L, D, b)
    HO = D.H * D.dh
    mlp = c * L * D.I * b * (D.n_mlp_in + 1)
    if one_pass(inp):
        phases.insert(1, Phase(PHASE_STATS, _one_pass_terms(D, inp, c, hess_dev, blk, act, x32, attn_fwd, mlp),
                               "every group's inputs from one forward per chunk"))
        phases.append(Phase(PHASE_PROPAGATE, _propagate_terms(blk, act, attn_fwd, mlp)))
        phases.append(_solve_phase(D, inp, blk, b))
        return phases
    phases.append(Phase(PHASE_OUT, with_fp({
        "block weights": blk, "input chunk": act, "attention forward": attn_fwd,
        "out-proj input (+ float32)": c * L * HO * (b + F32), "H partial": gram(HO), "H accumulator": acc(HO)},
        HO, c * L * HO * (b + F32))))
    mlp_in_terms = with_fp({
        "block weights": blk, "input chunk": act, "attention forward": attn_fwd, "residual stream": 3 * act,
        "MLP input (+ float32)": act + x32, "H partial": gram(D.d), "H accumulator": acc(D.d)}, D.d, act + x32)
    if inp.mlp_row_group:   # the MLP-input layers' outputs and gains (float32), E[m m^T] per row block
        gm = D.n_mlp_in * D.I * inp.mlp_row_group * F32
        mlp_in_terms.update({"MLP gains of one sample (float32)": L * D.I * F32 * (D.n_mlp_in + 4),
                             "E[m m^T] partial": gm, "E[m m^T] accumulator": gm if hess_dev else 0})
    phases.append(Phase(PHASE_MLP_IN, mlp_in_terms))
    phases.append(Phase(PHASE_MLP_OUT, with_fp({
        "block weights": blk, "input chunk": act, "residual stream": 3 * act, "MLP activations": mlp,
        "MLP output input (+ float32)": c * L * D.I * (b + F32), "H partial": gram(D.I), "H accumulator": acc(D.I)},
        D.I, c * L * D.I * (b + F32))))
    propagate = _propagate_terms(blk, act, attn_fwd, mlp)
    phases.append(Phase(PHASE_PROPAGATE, propagate))
    phases.append(_solve_phase(D, inp, blk, b))
    if fp:   # the full-precision block's forward on the fp stream: the same footprint
        phases.append(Phase(PHASE_FP_PROPAGATE, dict(propagate)))
    return phases


def one_pass(inp: PlanInputs) -> bool:
    """A block's statistics come from one forward per chunk (``BlockQuantizer.one_pass_statistics``):
    GPTQ and BoA without ``--true-sequential``; RTN's Hessian grid runs layer by layer."""
    return inp.calibration and inp.method != "rtn" and not inp.true_sequential


def _propagate_terms(blk: int, act: int, attn_fwd: int, mlp: int) -> dict:
    return {"block weights": blk, "input + output chunk": 2 * act, "attention forward": attn_fwd,
            "MLP activations": mlp, "residual stream": 3 * act}


def _one_pass_terms(D: Dims, inp: PlanInputs, c: int, hess_dev: bool, blk: int, act: int, x32: int,
                    attn_fwd: int, mlp: int) -> dict:
    """The one-forward statistics phase: the forward of a chunk (to the MLP-output layer's input;
    with --fp-targets the fp stream's chunk through the whole block, its output kept), the four
    recorded layer inputs of each stream held at once, one float32 copy and one Gram partial at a
    time, and every accumulator of the block (on the device when the Hessians live there)."""
    L, b = inp.seqlen, inp.dtype_bytes
    HO = D.H * D.dh
    gram = lambda n: n * n * F32  # noqa: E731
    streams = 2 if inp.fp_targets else 1
    boa = inp.method == "boa"
    sizes = (D.d, HO, D.d, D.I)                           # q/k/v, out-proj, MLP input, MLP output
    recorded = c * L * sum(sizes) * b
    rows_g = 2 * D.Hkv * D.dh * D.dh * F32 if boa else 0  # G_k, G_q
    accs = sum(gram(n) for n in sizes) * streams + rows_g
    terms = {"block weights": blk, "input chunk": act, "attention forward": attn_fwd, "residual stream": 3 * act,
             "MLP activations": mlp, "recorded layer inputs": recorded * streams,
             "float32 copy of one input": c * L * max(sizes) * F32,
             "H partial": gram(max(sizes)) + rows_g, "H accumulator": accs if hess_dev else 0}
    if boa:
        terms["q/k/v (float32, rotated)"] = c * L * (D.H + 2 * D.Hkv) * D.dh * F32 * 2
    if inp.fp_targets:
        terms.update({"fp-stream input + output chunk": 2 * act, "C partial": gram(max(sizes))})
    if inp.mlp_row_group:   # the MLP-input layers' outputs and gains (float32), E[m m^T] per row block
        gm = D.n_mlp_in * D.I * inp.mlp_row_group * F32
        terms.update({"MLP gains of one sample (float32)": L * D.I * F32 * (D.n_mlp_in + 4),
                      "E[m m^T] partial": gm, "E[m m^T] accumulator": gm if hess_dev else 0})
    return terms


def _solve_phase(D: Dims, inp: PlanInputs, blk: int, b: int) -> Phase:
    """The largest solver call of a block; V under block_v has one H_col per KV head."""
    worst = {}
    mlp_rows = D.I * inp.mlp_row_group * F32 if inp.mlp_row_group else 0
    for name, (r, cc) in D.linear_shapes.items():
        nh = D.Hkv if (inp.method == "boa" and inp.block_v and name.endswith("v_proj")) else 1
        tries = (inp.search_orders or inp.fp_bound) and inp.method != "rtn"   # copies of the Hessians
        ws = solver_workspace(r, cc, nh, b, tries,
                              max(D.H * D.dh * D.dh * F32, mlp_rows) if inp.method == "boa" else 0)
        if inp.fp_bound:
            ws["fp bound: the bounded target"] = r * cc * F32
        if sum(ws.values()) > sum(worst.values() or [0]):
            worst, worst_name = ws, name
    row_h = max(D.H * D.dh * D.dh * F32, mlp_rows) if inp.method == "boa" else 0
    solve = {"block weights": blk, **worst, "H_row": row_h}
    if inp.fp_targets:   # the weight is corrected before the solver runs: only what exceeds its workspace counts
        corr = max(2 * cc * cc * F32 + fp_target_workspace(r, cc) for r, cc in D.linear_shapes.values())
        if inp.block_v_targets:   # V: per-head H and C, one head's correction at a time
            r, cc = next((v for k, v in D.linear_shapes.items() if k.endswith("v_proj")), (D.Hkv * D.dh, D.d))
            corr = max(corr, 2 * D.Hkv * cc * cc * F32 + fp_target_workspace(r // D.Hkv, cc) + r * cc * F32)
        solve["fp-target correction (beyond the solver's workspace)"] = max(0, corr - sum(worst.values()) - row_h)
    return Phase(PHASE_SOLVE, solve, f"largest: {worst_name}")


def grid_candidates(coarse: int = 1, n_shrink: int = 80, roundings: int = 2) -> int:
    """Candidates the grid search scores per row (``solvers.grid.find_params``), each with one
    ``R x C x C`` product for the Hessian grid: every shrink factor (160), or with ``coarse=k``
    every k-th and then the k-1 either side of the best (48 at k = 8)."""
    if coarse <= 1:
        return n_shrink * roundings
    return roundings * (-(-n_shrink // coarse) + 2 * (coarse - 1))


def search_tries(D: Dims, inp: PlanInputs, i: int) -> int:
    """Solves of the ``i``-th linear of ``D.linear_shapes`` (q, k, v, o, the MLP-input layers, the
    MLP-output layer): 1, or with ``--search-orders`` every act-order combination (``block.BlockQuantizer
    ._orders``): 4 for BoA's layers with a row Hessian (q, k, v; the MLP-input layers with MLP row
    Hessians), 2 (with and without column act-order) for the rest and for GPTQ."""
    if not inp.search_orders or inp.method == "rtn":
        return 1
    rowed = i < 3 or (inp.mlp_row_group and 4 <= i < 4 + D.n_mlp_in)
    return 4 if inp.method == "boa" and rowed else 2


def _gflops(D: Dims, inp: PlanInputs) -> dict:
    """Arithmetic (GFLOP) of each phase for one block, keyed by phase name.

    Statistics phases count the partial block forward they run to reach their layer plus their
    Gram products (one pass: one forward per stream and all of the block's Grams); ``solve`` counts the grid search (Hessian grid only), the OPTQ sweep (``2RC^2``)
    and one Cholesky/inverse (``C^3``) per layer, times ``search_tries`` (each try also scored:
    ``2RC^2``). Dense counts; causal attention is counted full.
    """
    N, L = inp.nsamples, inp.seqlen
    tok = N * L
    HO = D.H * D.dh
    qkv = 2 * tok * D.d * (D.H + 2 * D.Hkv) * D.dh
    attn = 4 * tok * L * D.H * D.dh                       # q k^T and A v
    o = 2 * tok * HO * D.d
    mlp_in = 2 * tok * D.d * D.I * D.n_mlp_in
    block_linear = sum(r * c for r, c in D.linear_shapes.values())
    out = {PHASE_PROPAGATE: (2 * tok * block_linear + attn) / 1e9}
    if not inp.calibration:
        return out
    boa = inp.method == "boa"
    out[PHASE_ATTN] = (2 * tok * D.d * D.d + (2 * tok * D.d * (D.H + D.Hkv) * D.dh if boa else 0)) / 1e9
    if boa and inp.block_v:
        # scores and A X over the causal half only, in row chunks of c: the mean query sees (L + c) / 2 keys
        seen = (L + block_v_row_chunk(L)) / 2
        out[PHASE_BLOCK_V] = (2 * tok * seen * D.H * (D.dh + D.d) + 2 * tok * D.H * D.d * D.d) / 1e9
        if inp.block_v_targets:   # the fp stream's maps and A X, and the cross Grams
            out[PHASE_BLOCK_V] = (4 * tok * seen * D.H * (D.dh + D.d) + 4 * tok * D.H * D.d * D.d) / 1e9
    out[PHASE_OUT] = (qkv + attn + 2 * tok * HO * HO) / 1e9
    out[PHASE_MLP_IN] = (qkv + attn + o + 2 * tok * D.d * D.d) / 1e9
    if inp.mlp_row_group:   # the MLP-input layers' outputs and the block-diagonal gain Grams
        out[PHASE_MLP_IN] += (mlp_in + 2 * tok * D.I * inp.mlp_row_group * D.n_mlp_in) / 1e9
    out[PHASE_MLP_OUT] = (qkv + attn + o + mlp_in + 2 * tok * D.I * D.I) / 1e9
    grid = 2 * grid_candidates(inp.grid_coarse) if inp.qparam == "hessian" else 0
    refine = 4 * inp.refine_scales      # per sweep: the rows' U H_col products and the residual's
    out[PHASE_SOLVE] = sum(search_tries(D, inp, i) * ((grid + 2 + refine) * r * c * c + c ** 3)
                           + (2 * r * c * c * search_tries(D, inp, i) if inp.search_orders else 0)
                           for i, (r, c) in enumerate(D.linear_shapes.values())) / 1e9
    if inp.fp_targets:   # the fp stream's forward to each layer and C; the fp block's propagation;
        # the correction W (C - H) (H + lam I)^-1: a Cholesky (C^3 / 3) and two R x C x C products
        for ph in (PHASE_ATTN, PHASE_OUT, PHASE_MLP_IN, PHASE_MLP_OUT):
            out[ph] += out[ph] - (2 * tok * D.d * (D.H + D.Hkv) * D.dh / 1e9 if ph == PHASE_ATTN and boa else 0)
        out[PHASE_FP_PROPAGATE] = out[PHASE_PROPAGATE]
        out[PHASE_SOLVE] += sum(c ** 3 / 3 + 4 * r * c * c for r, c in D.linear_shapes.values()) / 1e9
    if one_pass(inp):   # one forward to the MLP-output layer's input, every Gram of the block; with
        # --fp-targets the fp stream's whole block forward (its propagation) and every C as well
        grams = 2 * tok * (2 * D.d * D.d + HO * HO + D.I * D.I)
        g = qkv + attn + o + mlp_in + grams + (2 * tok * D.d * (D.H + D.Hkv) * D.dh if boa else 0)
        if inp.mlp_row_group:
            g += mlp_in + 2 * tok * D.I * inp.mlp_row_group * D.n_mlp_in
        if inp.fp_targets:
            g += 2 * tok * block_linear + attn + grams
        for ph in (PHASE_ATTN, PHASE_OUT, PHASE_MLP_IN, PHASE_MLP_OUT, PHASE_FP_PROPAGATE):
            out.pop(ph, None)
        out[PHASE_STATS] = g / 1e9
    return out


def make_plan(adapter: ModelAdapter, inp: PlanInputs, budget: int, cpu_budget: int | None = None,
              hessians: str = "auto") -> Plan:
    """Largest chunking that fits ``budget`` (device) and ``cpu_budget`` (host), or PlanError."""
    D = Dims.from_adapter(adapter)
    N = inp.nsamples
    limit = budget * SAFETY
    n_rep = D.H // D.Hkv

    def fits(c, ca, g, hd):
        return all(p.total <= limit for p in build_phases(D, inp, c, ca, g, hd))

    # smallest possible plan first: refuse clearly if even that is too big
    minimal = build_phases(D, inp, 1, 1, n_rep, False)
    too_big = [p for p in minimal if p.total > limit]
    if too_big:
        worst = max(too_big, key=lambda p: p.total)
        top = sorted(worst.terms.items(), key=lambda kv: -kv[1])[:3]
        raise PlanError(
            f"device budget {fmt_bytes(budget)} is too small: the smallest plan needs "
            f"{fmt_bytes(worst.total / SAFETY)} for '{worst.name}' ({', '.join(f'{k} {fmt_bytes(v)}' for k, v in top)}; "
            f"{int(100 * (1 - SAFETY))}% headroom kept)"
            + (". Try --no-block-v" if worst.name.startswith(("block_v", "solve")) and inp.block_v
               and inp.method == "boa" else "")
            + (" or a shorter --seqlen" if "statistics" in worst.name or "propagate" in worst.name else ""))
    hess_dev = hessians == "device" or (hessians == "auto" and fits(1, 1, n_rep, True))
    if hessians == "device" and not fits(1, 1, n_rep, True):
        raise PlanError("--hessians device does not fit the device budget; use --hessians cpu")

    def capped(cand):
        return inp.max_chunk_tokens is None or cand == 1 or cand * inp.seqlen <= inp.max_chunk_tokens

    c = 1
    for cand in sorted({N, *[2 ** k for k in range(0, N.bit_length())]}, reverse=True):
        if cand <= N and capped(cand) and fits(cand, 1, n_rep, hess_dev):
            c = cand
            break
    g, ca = n_rep, 1
    if inp.method == "boa" and inp.block_v:
        for cand in range(D.H, n_rep - 1, -n_rep):
            if fits(c, 1, cand, hess_dev):
                g = cand
                break
        for cand in sorted({N, *[2 ** k for k in range(0, N.bit_length())]}, reverse=True):
            if cand <= N and capped(cand) and fits(c, cand, g, hess_dev):
                ca = cand
                break
    phases = build_phases(D, inp, c, ca, g, hess_dev)

    # host memory: activations (in + out), the largest set of Hessians kept on the host (all of
    # them without true-sequential statistics), one block staged on its way to the device,
    # calibration ids
    L, b = inp.seqlen, inp.dtype_bytes
    streams = 2 if inp.fp_targets else 1           # --fp-targets: the fp model's activations as well
    acts = streams * 2 * N * L * D.d * b if inp.calibration else 0
    held = host_hessians_by_phase(D, inp)
    hess_host = max(held.values(), default=0)
    cpu_terms = {"activations (in + out)": acts, "Hessians on host": hess_host,
                 "block staging": D.block_params * b * 2, "calibration ids": N * L * 8, "runtime": CPU_FIXED}
    on_disk = False
    if cpu_budget is not None and sum(cpu_terms.values()) > cpu_budget * SAFETY and acts:
        on_disk = True
        cpu_terms["activations (in + out)"] = 0
        cpu_terms["activation chunks in flight (disk memmap)"] = streams * 2 * c * L * D.d * b
    if cpu_budget is not None and sum(cpu_terms.values()) > cpu_budget * SAFETY:
        top = sorted(cpu_terms.items(), key=lambda kv: -kv[1])[:3]
        raise PlanError(f"host budget {fmt_bytes(cpu_budget)} is too small even with activations on "
                        f"disk: needs {fmt_bytes(sum(cpu_terms.values()) / SAFETY)} "
                        f"({', '.join(f'{k} {fmt_bytes(v)}' for k, v in top)})")
    disk, disk_peak = disk_plan(D, inp, on_disk)
    rest = sum(cpu_terms.values()) - hess_host
    return Plan(inputs=inp, budget=budget, cpu_budget=cpu_budget, chunk=c, attn_chunk=ca, attn_heads=g,
                hessians_on_device=hess_dev, activations_on_disk=on_disk, phases=phases,
                cpu_terms=cpu_terms, gflop_per_block=_gflops(D, inp), disk_terms=disk, disk_peak=disk_peak,
                host_by_phase={p.name: rest + held.get(p.name, 0) for p in phases})


def host_hessians_by_phase(D: Dims, inp: PlanInputs) -> dict:
    """float32 Hessians held on the host during each phase of a block, in the pipeline's order.

    One pass (default): every set but block_v's is accumulated in the one-forward phase, then
    block_v's; all are held through the solve phase. True-sequential: q/k/v's H (and block_v's per-head H of V) stay referenced for
    the whole block, the later sets one at a time. RTN: one layer's H at a time.
    """
    if not inp.calibration:
        return {}
    qkv = D.d * D.d * F32
    v = D.Hkv * D.d * D.d * F32 if inp.method == "boa" and inp.block_v else 0
    if inp.block_v_targets:   # and V's per-head C
        v *= 2
    o, mlp_in, mlp_out = (D.H * D.dh) ** 2 * F32, D.d * D.d * F32, D.I * D.I * F32
    if inp.mlp_row_group:    # E[m m^T] (then the row Hessian) of each MLP-input layer, row blocks only
        mlp_in += D.n_mlp_in * D.I * inp.mlp_row_group * F32
    if inp.method == "rtn":
        big = max(qkv, o, mlp_out)
        return {PHASE_ATTN: big, PHASE_OUT: big, PHASE_MLP_IN: big, PHASE_MLP_OUT: big, PHASE_SOLVE: big}
    if inp.fp_targets:   # one pass; every H has its C = X_fp X~^T (V under block_v uses q/k/v's)
        qkv, o, mlp_in, mlp_out = 2 * qkv, 2 * o, 2 * mlp_in, 2 * mlp_out
    if one_pass(inp):   # every set accumulated in one phase, then block_v's, all held through the solves
        return {PHASE_STATS: qkv + o + mlp_in + mlp_out, PHASE_BLOCK_V: qkv + v + o + mlp_in + mlp_out,
                PHASE_SOLVE: qkv + v + o + mlp_in + mlp_out}
    first = qkv + v     # true-sequential
    return {PHASE_ATTN: qkv, PHASE_BLOCK_V: first, PHASE_OUT: first + o, PHASE_MLP_IN: first + mlp_in,
            PHASE_MLP_OUT: first + mlp_out, PHASE_SOLVE: first + max(o, mlp_in, mlp_out)}


DISK_STATE = "run state (packed codes + grids, all blocks)"
DISK_ACTS = "activation memmap"
DISK_FAKE = "fake-quantized checkpoint"


def disk_plan(D: Dims, inp: PlanInputs, activations_on_disk: bool) -> tuple[dict, int]:
    """Bytes on disk by item, and the peak: the run state and the activation memmap while blocks
    are quantized (the memmap is deleted after the last block), then the state plus the outputs.

    State per block: codes at ``wbits`` bits + a float32 scale and zero per row and group + the
    block's other tensors (norms, biases) in the run dtype. Outputs: the fake-quantized checkpoint
    (every parameter in the run dtype) and each ``--export`` format (codes packed at ``wbits`` bits,
    grids, embeddings and head in the run dtype; the int32 layouts are within a few % of it).
    """
    b, bits = inp.dtype_bytes, inp.wbits
    linear = sum(r * c for r, c in D.linear_shapes.values())
    n_groups = {k: (1 if inp.group_size is None else -(-c // inp.group_size)) for k, (r, c) in D.linear_shapes.items()}
    codes = sum(r * -(-c * bits // 8) for r, c in D.linear_shapes.values())      # rows bit-packed
    other = (D.block_params - linear) * b
    # state: float32 scale and zero per row and group; packed export: float32 scale, zero bit-packed
    state = D.n_blocks * (codes + sum(r * n_groups[k] * 2 * F32 for k, (r, c) in D.linear_shapes.items()) + other)
    packed_blocks = D.n_blocks * (codes + other + sum(r * (n_groups[k] * F32 + -(-n_groups[k] * bits // 8))
                                                      for k, (r, c) in D.linear_shapes.items()))
    streams = 2 if inp.fp_targets else 1
    acts = streams * 2 * inp.nsamples * inp.seqlen * D.d * b if activations_on_disk and inp.calibration else 0
    rest = D.embed_params + D.head_params + 2 * D.d              # + the final norm (weight and bias at most)
    fake = (D.n_blocks * D.block_params + rest) * b if inp.fake_quant else 0
    packed = packed_blocks + rest * b
    terms = {DISK_STATE: state, DISK_ACTS: acts, DISK_FAKE: fake}
    for fmt in inp.exports:
        terms[f"export {fmt}"] = packed
    outputs = fake + packed * len(inp.exports)
    return terms, max(state + acts, state + outputs)


PHASE_HEAD = "LM head (logits, NLL)"


@dataclass
class EvalPlan:
    budget: int
    chunk: int              # windows per block-forward chunk
    head_tokens: int        # positions per logits slice
    phases: list

    @property
    def peak(self) -> int:
        return max(p.total for p in self.phases)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def make_eval_plan(adapter: ModelAdapter, n_windows: int, seqlen: int, dtype_bytes: int, budget: int) -> EvalPlan:
    """Chunking for streaming evaluation (perplexity) of ``n_windows`` windows of ``seqlen``."""
    D = Dims.from_adapter(adapter)
    b, L = dtype_bytes, seqlen
    limit = budget * SAFETY
    inp = PlanInputs(method="gptq", calibration=True, nsamples=n_windows, seqlen=L, dtype_bytes=b)
    head_w = (D.head_params or D.V * D.d) * b + 2 * D.d * b

    def phases(c, s):
        base = {p.name: p for p in build_phases(D, inp, c, 1, D.H // D.Hkv, False)}
        head = Phase(PHASE_HEAD, {"LM head weights": head_w, "hidden chunk": c * L * D.d * b,
                                  "logits + log-probabilities (float32)": 3 * c * s * D.V * F32})
        return [base[PHASE_EMBED], base[PHASE_PROPAGATE], head]

    def fits(c, s):
        return all(p.total <= limit for p in phases(c, s))

    if not fits(1, 1):
        worst = max(phases(1, 1), key=lambda p: p.total)
        raise PlanError(f"device budget {fmt_bytes(budget)} is too small to evaluate: '{worst.name}' needs "
                        f"{fmt_bytes(worst.total / SAFETY)}")
    s = next(x for x in sorted({L, *[2 ** k for k in range(L.bit_length())]}, reverse=True) if x <= L and fits(1, x))
    c = next(x for x in sorted({n_windows, *[2 ** k for k in range(n_windows.bit_length())]}, reverse=True)
             if x <= n_windows and fits(x, s))
    return EvalPlan(budget=budget, chunk=c, head_tokens=s, phases=phases(c, s))
