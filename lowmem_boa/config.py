"""Run configuration: what determines the quantized weights vs. how the run executes.

``QuantConfig`` fields change the result and key the resume manifest; ``RunOptions`` only
change where and how fast it runs (a resumed run may use different options; bit-identical
results with an uninterrupted run are guaranteed when they match).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .solvers.validation import GRIDS

METHODS = ("boa", "gptq", "rtn")
WBITS = (2, 3, 4, 8)
CALIB_SETS = ("wikitext2", "ptb", "c4")
DTYPES = ("auto", "float16", "bfloat16", "float32")


# Calibration windows when --nsamples is not given: 128 (GPTQ's and the paper's count), also when the
# windows are shorter than the paper's 2048 tokens. Keeping the paper's token count instead (512 x 512
# on a 512-position model) costs 4x the time and did not improve stories260K at 2 bits
# (docs/results.md, "Calibration budget"), so it is an option, not the default.
DEFAULT_NSAMPLES = 128

# Issue 17's corrections, on by default since they were measured on SmolLM2 (both texts, seeds 0-1) and
# stories260K (seeds 0-4): fp targets at alpha 0.25, one sweep of scale refinement, BoA grids that follow
# the updated rows (docs/results.md, "Issue 17's corrections"). --no-fp-targets --refine-scales 0
# --no-follow-grids is the solver of earlier versions.
FP_TARGETS_DEFAULT = True

# Issue 17's speed options for BoA, default since they measured no worse on SmolLM2 (reference recipe,
# both texts, seeds 0-1: 90.77 / 386.3 against 93.26 / 393.3, in 565 s against 1,274-1,427 s measured
# with a third job on the cores; alone on the earlier solver they solve 3.5x faster; docs/results.md): 16
# rows of a head quantized at once, and the grid search coarse to fine (every 8th shrink factor, then
# around the best). --joint-rows 1 --grid-coarse 1 is the full search row by row. GPTQ keeps the full
# grid search until the coarse one is measured on SmolLM2 for it.
JOINT_ROWS_DEFAULT = 16
BOA_GRID_COARSE = 8


def joint_rows_for(rows_per_head: int, joint_rows: int | None) -> int:
    """The rows BoA quantizes at once in a head (or MLP row group) of ``rows_per_head`` rows:
    ``--joint-rows N`` as given; by default (None) JOINT_ROWS_DEFAULT, but at most a quarter of the head,
    so that every head keeps at least four row blocks whose closed-form update uses the row Hessian
    (with N = head_dim nothing is left to update and BoA becomes GPTQ per head). 16 for every layer of
    SmolLM2 (heads of 64, MLP row groups of 128) and Llama-2-7B (128); 2 for stories260K's heads of 8."""
    if joint_rows is not None:
        return joint_rows
    return max(1, min(JOINT_ROWS_DEFAULT, rows_per_head // 4))

# BoA's MLP row Hessians (--mlp-row-hessian) when the flag is not given: on up to this many bits. On
# stories260K (docs/results.md, chosen on its validation text) they lowered 2- and 3-bit perplexity
# below the paper's BoA and GPTQ, and raised it at 4 bits.
MLP_ROW_MAX_BITS = 3
# act-order's default (BoA: column and row; GPTQ: column) up to this many bits, per channel and with
# --group-size: measured at 2, 3 and 4 bits per channel and at 3 and 4 bits with groups of 128 (SmolLM2, both
# texts, seeds 0-1; above 4 bits unmeasured)
ACT_ORDER_MAX_BITS = {"boa": 4, "gptq": 4}
BLOCK_V_MIN_BITS = 3   # block_v's default: on from this many bits (SmolLM2: off won at 2 bits, on at 3)


@dataclass
class QuantConfig:
    model: str
    method: str = "boa"
    wbits: int = 2
    sym: bool = False
    group_size: int | None = None
    qparam: str = "hessian"
    block_v: bool | None = None     # BoA: V's per-head attention-weighted column Hessian (the paper's Table 1);
                                    # None: off at 2 bits, on from BLOCK_V_MIN_BITS (SmolLM2, docs/results.md),
                                    # resolved by the pipeline
    act_order_col: bool | None = None   # columns swept by decreasing diag(H_col) (GPTQ's desc_act); None: on
                                    # for BoA and GPTQ at 2-3 bits per channel, 2-4 bits with groups
                                    # (default_act_order_col), resolved by the pipeline
    act_order_row: bool | None = None   # BoA: rows of a head (or MLP row group) by decreasing diag(H_row); None:
                                    # as the columns for BoA (default_act_order_row)
    search_orders: bool = False
    true_sequential: bool = False   # one pass over the fp block (measured better, docs/results.md)
    v_row_hessian: bool = True
    mlp_row_hessian: bool | None = None   # BoA: row Hessian of the MLP-input layers through the MLP output;
                                    # None: on at 2-3 bits, off at 4+ (MLP_ROW_MAX_BITS); off = the paper's BoA
    mlp_row_group: int = 512        # ... block-diagonal in groups of at most this many rows (SmolLM2: 512 beat
                                    # 128 on both texts; one group of all rows costs I sequential sweeps)
    mlp_row_damp: float = 0.0       # ... plus this fraction of each group's mean diagonal (towards GPTQ's rows)
    fp_targets: bool | None = None  # fit Q X~ towards the fp model's W X (asymmetric calibration); None: on
                                    # for GPTQ/BoA with one-pass statistics (FP_TARGETS_DEFAULT), resolved by the pipeline
    fp_alpha: float = 0.25          # ... moving the target this fraction of the way (GPTAQ/TurboBoA's alpha)
    fp_max_shift: float = 1.0       # ... a layer with ||W' - W|| > this * alpha * ||W|| (a wild target) is also
                                    # solved on the target bounded to it; the lower objective wins; 0: never
    block_v_targets: bool = False   # BoA, block_v with fp targets: V's target from the attention-weighted per-head
                                    # cross statistics (the fp stream's attention maps) instead of q/k/v's plain ones
    follow_grids: bool = True       # BoA: a row's grid searched on the row as updated, right before it is swept
    refine_scales: int = 1          # GPTQ/BoA: coordinate-descent sweeps of scale refinement once codes are fixed
    joint_rows: int | None = None   # BoA: rows of a head quantized together (closed-form update of the rest);
                                    # None: joint_rows_for's default (16, at most a quarter of a head)
    grid_coarse: int | None = None  # MMSE/Hessian grid search: every k-th shrink factor, then around the best;
                                    # None: BOA_GRID_COARSE for BoA, 1 (the full search) for GPTQ/RTN
    kquant: str | None = None       # llama.cpp k-quant grid (q2_k ... q6_k) for every quantized layer: GGUF export;
                                    # sets the bit width, no scale refinement (the stored sub-scales are the grid)
    kquant_types: dict | None = None  # per-layer GGUF types over --kquant ({"mlp.down_proj": "q3_k"}), as
                                    # llama-quantize's --tensor-type (llama.cpp's own Q2_K file: ffn_down Q3_K)
    kquant_embedding: str | None = None  # GGUF type of the token embedding / output head (rounded, no Hessian):
                                    # None = auto (llama.cpp's: Q6_K, Q8_0 where rows are not 256s); "float" keeps
                                    # the source precision. Not in the run's key: the blocks do not depend on it
    residual_weights: bool = False  # MLP-output layer: each token's error divided by the block output's mean
                                    # square there (what the next RMSNorm divides by; an attention-sink token's
                                    # massive activation no longer owns H_col). GPTQ/BoA, one-pass statistics
    percdamp: float = 0.01
    block_size: int = 128
    calib: str = "wikitext2"
    calib_file: str | None = None
    nsamples: int | None = None     # None: DEFAULT_NSAMPLES, resolved (and announced) by the pipeline
    seqlen: int = 2048
    seed: int = 0
    dtype: str = "auto"

    def __post_init__(self):
        if self.kquant is not None:
            from .solvers.kquant import KTYPES, FILE_TYPES, base_type
            name = str(self.kquant).lower()
            kt = KTYPES.get(base_type(name))
            if kt is not None:
                self.kquant = name if name in FILE_TYPES else kt.name
                self.wbits = kt.bits
                self.refine_scales = 0
        if self.kquant_types:
            from .solvers.kquant import KTYPES
            self.kquant_types = {str(k): KTYPES[str(v).lower()].name if str(v).lower() in KTYPES else str(v)
                                 for k, v in self.kquant_types.items()}
        if self.kquant_embedding is not None:
            self.kquant_embedding = str(self.kquant_embedding).lower()
            if self.kquant_embedding == "auto":
                self.kquant_embedding = None
        if self.grid_coarse is None:
            self.grid_coarse = BOA_GRID_COARSE if self.method == "boa" else 1

    def validate(self) -> None:
        """Clear errors for bad values, before any work."""
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.wbits not in WBITS and self.kquant is None:   # (a k-quant type sets its own width: 5, 6 too)
            raise ValueError(f"--wbits must be one of {', '.join(map(str, WBITS))}, got {self.wbits!r}")
        if self.qparam not in GRIDS:
            raise ValueError(f"--qparam must be one of {', '.join(GRIDS)}, got {self.qparam!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"--group-size must be a positive integer, got {self.group_size!r}")
        if self.calib_file is None and self.calib not in CALIB_SETS:
            raise ValueError(f"--calib must be one of {', '.join(CALIB_SETS)} (or use --calib-file), "
                             f"got {self.calib!r}")
        if self.nsamples is not None and self.nsamples < 1:
            raise ValueError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise ValueError(f"--seqlen must be at least 2, got {self.seqlen}")
        if not 0 <= self.percdamp < 1e3:
            raise ValueError(f"--percdamp must be non-negative, got {self.percdamp}")
        if self.block_size < 1:
            raise ValueError(f"--block-size must be positive, got {self.block_size}")
        if self.mlp_row_group < 1:
            raise ValueError(f"--mlp-row-group must be positive, got {self.mlp_row_group}")
        if not 0 <= self.mlp_row_damp < 1e6:
            raise ValueError(f"--mlp-row-damp must be non-negative, got {self.mlp_row_damp}")
        if not 0 < self.fp_alpha <= 1:
            raise ValueError(f"--fp-alpha must be in (0, 1], got {self.fp_alpha}")
        if not 0 <= self.fp_max_shift < float("inf"):
            raise ValueError(f"--fp-max-shift must be a non-negative number (0: no guard), got {self.fp_max_shift}")
        if not isinstance(self.refine_scales, int) or self.refine_scales < 0:
            raise ValueError(f"--refine-scales must be a non-negative integer, got {self.refine_scales!r}")
        if not isinstance(self.grid_coarse, int) or self.grid_coarse < 1:
            raise ValueError(f"--grid-coarse must be a positive integer, got {self.grid_coarse!r}")
        if self.joint_rows is not None and (not isinstance(self.joint_rows, int) or self.joint_rows < 1):
            raise ValueError(f"--joint-rows must be a positive integer, got {self.joint_rows!r}")
        if self.fp_targets and self.method == "rtn":
            raise ValueError("--fp-targets needs calibration solves: use --method gptq or boa")
        if self.fp_targets and self.true_sequential:
            raise ValueError("--fp-targets fits one-pass statistics; it cannot be combined with --true-sequential")
        if self.block_v_targets:
            block_v = self.default_block_v() if self.block_v is None else self.block_v
            off = [why for why, bad in (("--method boa", self.method != "boa"), ("--block-v", not block_v),
                                        ("--fp-targets", self.fp_targets is False or self.true_sequential)) if bad]
            if off:
                raise ValueError("--block-v-targets corrects V's fp target under block_v: it needs "
                                 + ", ".join(off) + (" (fp targets are off with --true-sequential)"
                                                     if self.true_sequential else ""))
        if self.residual_weights and (self.method == "rtn" or self.true_sequential):
            raise ValueError("--residual-weights weighs the one-pass calibration statistics: use --method gptq or boa "
                             "without --true-sequential")
        if self.kquant is not None:
            from .solvers.kquant import FILE_TYPES, K_TYPES
            if self.kquant not in K_TYPES and self.kquant not in FILE_TYPES:
                raise ValueError(f"--kquant must be one of {', '.join(K_TYPES)} (one type) or llama.cpp's file types "
                                 f"{', '.join(FILE_TYPES)}, got {self.kquant!r}")
            clash = [flag for flag, on in (("--method rtn", self.method == "rtn"), ("--sym", self.sym),
                                           ("--group-size", self.group_size is not None),
                                           ("--act-order-col", self.act_order_col),
                                           ("--search-orders", self.search_orders)) if on]
            if clash:
                raise ValueError(f"--kquant {self.kquant} fixes the grid (super-blocks of 256 columns, the type's "
                                 f"sub-blocks and stored scales); it cannot be combined with {', '.join(clash)}")
        if self.kquant_types:
            from .solvers.kquant import KTYPES
            if self.kquant is None:
                raise ValueError("--kquant-type sets types per layer over --kquant TYPE: add --kquant")
            bad = [f"{k}={v}" for k, v in self.kquant_types.items() if v not in KTYPES]
            if bad:
                raise ValueError(f"--kquant-type {', '.join(bad)}: the type must be one of {', '.join(KTYPES)}")
        if self.kquant_embedding is not None:
            from .solvers.kquant import EMBEDDING_TYPES
            if self.kquant is None:
                raise ValueError("--kquant-embedding sets the GGUF embedding type of a --kquant run: add --kquant")
            if self.kquant_embedding not in EMBEDDING_TYPES:
                raise ValueError(f"--kquant-embedding must be one of {', '.join(EMBEDDING_TYPES)}, "
                                 f"got {self.kquant_embedding!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def default_mlp_row_hessian(self) -> bool:
        """``mlp_row_hessian`` when the flag is not given: BoA up to MLP_ROW_MAX_BITS."""
        return self.method == "boa" and self.wbits <= MLP_ROW_MAX_BITS

    def default_act_order_col(self) -> bool:
        """``act_order_col`` when the flag is not given: on for BoA and GPTQ up to ACT_ORDER_MAX_BITS[method],
        per channel and with groups (static groups) (SmolLM2, both texts, docs/results.md: BoA at 2 bits -24 %
        WikiText-2 and -42 % C4 perplexity at the paper's protocol, at 3 bits -6 % / -10 % at the reference
        recipe; GPTQ at 2 bits -24 % / -29 %, at 3 bits -8 % / -8 % at the reference recipe; at 4 bits per
        channel, reference recipe, seeds 0-1: BoA -2.1 % / -2.2 %, GPTQ -4.7 % / -7.4 %; with groups of 128, reference
        recipe, seeds 0-1: at 3 bits BoA -1.6 % / -3.9 %, GPTQ -4.8 % / -7.4 %, at 4 bits BoA -0.8 % / -0.1 %,
        GPTQ -2.6 % / -2.7 %; at the solver's time);
        off for RTN, with --kquant (it fixes the column blocks), with --search-orders (which tries every order
        itself) and above those widths (unmeasured)."""
        return (self.method in ACT_ORDER_MAX_BITS and self.kquant is None and not self.search_orders
                and self.wbits <= ACT_ORDER_MAX_BITS[self.method])

    def default_act_order_row(self) -> bool:
        """``act_order_row`` when the flag is not given: BoA's rows follow its columns' rule (GPTQ and RTN
        have no row order)."""
        return self.method == "boa" and self.default_act_order_col()

    def default_block_v(self) -> bool:
        """``block_v`` when the flag is not given: BoA from BLOCK_V_MIN_BITS."""
        return self.method == "boa" and self.wbits >= BLOCK_V_MIN_BITS

    @property
    def uses_calibration(self) -> bool:
        """GPTQ and BoA always; RTN only to search a Hessian grid."""
        return self.method != "rtn" or self.qparam == "hessian"

    def as_dict(self) -> dict:
        return asdict(self)

    def state_dict(self) -> dict:
        """``as_dict`` without the options added after runs were first keyed by it, where they hold
        the value that reproduces the code before them, and without options that do not act on this
        configuration (``fp_alpha`` without fp targets, BoA's row options for GPTQ/RTN): a run started
        before an option existed resumes under the code that has it (given the flags that reproduce it).
        ``kquant_embedding`` acts only on the final write, never on the blocks: not in the key."""
        d = asdict(self)
        d.pop("kquant_embedding")      # written after the blocks: a finished run rerun with another rewrites it
        if not self.fp_targets:
            d.pop("fp_alpha")
            d.pop("fp_max_shift")
        if self.method != "boa":
            d.pop("follow_grids")
            d.pop("joint_rows")
        # a changed default keys a configuration it does not act on at its old value (CHANGED_DEFAULTS): such
        # runs keep the key they had before the change
        mlp_rows = self.mlp_row_hessian if self.mlp_row_hessian is not None else self.default_mlp_row_hessian()
        acts = {"block_v": self.method == "boa", "mlp_row_group": self.method == "boa" and mlp_rows}
        for k, (before, _) in CHANGED_DEFAULTS.items():
            if not acts.get(k, True):    # (act-order acts wherever on; off, it resolves to the old value)
                d[k] = before
        if self.method == "rtn":
            d.pop("refine_scales")
        return {k: v for k, v in d.items() if k not in ADDED_LATER or v != ADDED_LATER[k]}


# option -> (its default before, the flag that restores it): a run started before the default changed is keyed
# with the old value; resuming it without the flag names the flag (checkpoint.state)
CHANGED_DEFAULTS = {"block_v": (True, "--block-v"),                    # off at 2 bits since then
                    "mlp_row_group": (128, "--mlp-row-group 128"),     # 512 since then
                    "act_order_col": (False, "--no-act-order-col"),    # on at 2-4 bits since then
                    "act_order_row": (False, "--no-act-order-row")}

# option -> the value that reproduces the code before it existed (see QuantConfig.state_dict)
ADDED_LATER = {"mlp_row_damp": 0.0, "fp_alpha": 1.0, "follow_grids": False, "refine_scales": 0, "joint_rows": 1,
               "grid_coarse": 1, "kquant": None, "kquant_types": None, "residual_weights": False,
               "fp_max_shift": 0.0, "block_v_targets": False}


@dataclass
class RunOptions:
    output: str | None = None
    device: str = "auto"
    max_gpu_mem: str | None = None
    max_cpu_mem: str | None = None
    data_dir: str | None = None
    overwrite: bool = False
    plan_only: bool = False
    hessians: str = "auto"          # auto | cpu | device
    progress: bool = True
    eval_ppl: bool = False          # WikiText-2 perplexity of the result, in-process
    export: list = field(default_factory=list)   # packed | gptq | gptq_v2 | compressed-tensors
    fake_quant: bool = True         # write the fake-quantized HF checkpoint into --output
    state_dir: str | None = None    # resumable run state (default OUTPUT/quant_state)

    def as_dict(self) -> dict:
        return asdict(self)
