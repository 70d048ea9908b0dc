"""llama.cpp's k-quant grids (GGUF Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as solver grids (pure tensors).

A k-quant super-block covers 256 consecutive input columns of one row; its sub-blocks (16 or 32
columns) each have a scale and, for the asymmetric types, a minimum, themselves stored as small
integers times one float16 super-scale ``d`` (and ``dmin``):

* asymmetric (Q2_K: 2-bit codes, sub-blocks of 16, 4-bit sc and m; Q4_K / Q5_K: 4 / 5-bit codes,
  sub-blocks of 32, 6-bit sc and m): ``w = (d·sc_j)·q − (dmin·m_j)``, ``q = clamp(rint((x + dmin·m_j) /
  (d·sc_j)), 0, 2^b − 1)`` — an *offset* grid, not an integer zero-point;
* symmetric (Q3_K: 3-bit, sub-blocks of 16, 6-bit signed sc − 32; Q6_K: 6-bit, sub-blocks of 16,
  int8 sc): ``w = (d·sc_j)·(q − z)`` with ``z = 4`` / ``32``, the integer-zero grid of ``solvers.grid``.

``superblock_grid`` chooses one super-block's grid from the weights it is about to quantize (the
solver calls it when its column sweep reaches the super-block, on the weights as updated so far)
and rounds it to what the format stores, so the solver quantizes onto exactly the grid the file
will hold. The search is weighted by the columns' importance (``diag(H_col)``): shrunk ranges and
stepped scales, each refitted by weighted least squares for its codes, then each stored integer
scale / minimum moved to whichever neighbour (±1) rounds the sub-block with the least error; ``export.gguf_quants.pack_superblocks`` writes the GGUF bytes, whose dequantization by
llama.cpp's reference (the ``gguf`` package) reproduces ``dequantize`` here bit for bit
(tests/test_kquant.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True)
class KType:
    name: str
    bits: int
    sub: int              # columns per sub-block (one scale each)
    sc_max: int           # largest stored sub-scale (asymmetric: 0..sc_max; symmetric: -sc_max-1..sc_max)
    offset: bool          # asymmetric (w = s q - m) or symmetric (w = s (q - zero))
    zero: int = 0         # symmetric types' fixed zero point
    type_size: int = 0    # bytes per block
    block: int = QK_K     # columns per block: 256 (k-quants) or 32 (the older types: one float16 scale,
                          # and minimum, per 32 columns, no integer sub-scales)

    @property
    def legacy(self) -> bool:
        return self.block != QK_K


KTYPES = {
    "q2_k": KType("q2_k", 2, 16, 15, True, type_size=84),
    "q3_k": KType("q3_k", 3, 16, 31, False, zero=4, type_size=110),
    "q4_k": KType("q4_k", 4, 32, 63, True, type_size=144),
    "q5_k": KType("q5_k", 5, 32, 63, True, type_size=176),
    "q6_k": KType("q6_k", 6, 16, 127, False, zero=32, type_size=210),
    # 32-column types, for layers whose inputs are not a multiple of 256 (as llama.cpp falls back)
    "q4_0": KType("q4_0", 4, 32, 0, False, zero=8, type_size=18, block=32),
    "q4_1": KType("q4_1", 4, 32, 0, True, type_size=20, block=32),
    "q5_0": KType("q5_0", 5, 32, 0, False, zero=16, type_size=22, block=32),
    "q5_1": KType("q5_1", 5, 32, 0, True, type_size=24, block=32),
    "q8_0": KType("q8_0", 8, 32, 0, False, zero=128, type_size=34, block=32),
}
K_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")   # what --kquant accepts
# a layer whose inputs are not a multiple of 256 gets the 32-column type llama.cpp's quantizer falls back
# to (llama_tensor_get_type; Q4_0 under Q2_K, as the llama.cpp of llama-cpp-python 0.3.36 writes it; some
# versions pick IQ4_NL there, not built here: the same 4.5 bpw)
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


# llama.cpp's file types (llama-quantize's names; ``q2_k_m`` is its "Q2_K", whose name we keep for one type):
# a base k-quant and the layers llama.cpp's rules give more bits (``llama_file_type_overrides``)
FILE_TYPES = {"q2_k_m": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k",
              "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k"}


# general.file_type (gguf.LlamaFileType's "mostly" label) a --kquant run's file declares; a one-type k-quant
# is llama.cpp's _S file type (q2_k: its Q2_K)
GGUF_FILE_TYPE = {"q2_k": "MOSTLY_Q2_K", "q2_k_m": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_S", "q3_k_s": "MOSTLY_Q3_K_S",
                  "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L", "q4_k": "MOSTLY_Q4_K_S",
                  "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k": "MOSTLY_Q5_K_S",
                  "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}


def override_layer(key: str, n_blocks: int) -> str:
    """The layer a ``--kquant-type`` key names: ``"NAME"`` (every block) or ``"BLOCK.NAME"`` (one block,
    ``BLOCK < n_blocks``; a leading number that is not a block index stays part of the name)."""
    head, _, rest = key.partition(".")
    return rest if head.isdigit() and int(head) < n_blocks else key


def base_type(kquant: str) -> str:
    """The k-quant of ``--kquant`` (a type, or a llama.cpp file type's base type)."""
    return FILE_TYPES.get(kquant, kquant)


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the blocks and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_file_type_overrides(file_type: str, layers, n_blocks: int, n_gqa: int) -> dict:
    """Per-block types (``{"BLOCK.LAYER": type}``) of llama.cpp's file type for a dense model's blocks, as
    ``llama_tensor_get_type`` chooses them (llama.cpp's ``llama-quant.cpp``: the value projection, the
    attention output and the MLP down projection get more bits in some blocks; every other layer the base
    type; the embedding / output head are ``--kquant-embedding``'s, whose default is llama.cpp's).
    ``layers``: the block's linear names; roles by suffix (``v_proj``; ``o_proj``/``out_proj``;
    ``down_proj``/``fc2``). Checked against llama.cpp's own files of SmolLM2 (Q2_K, Q3_K_M, Q4_K_M) in
    ``benchmarks/llamacpp_check.py``."""
    ft = file_type.lower()
    if ft not in FILE_TYPES:
        raise ValueError(f"unknown llama.cpp file type {file_type!r}; choose from {', '.join(FILE_TYPES)}")
    n = n_blocks

    def v(i):
        return {"q2_k_m": "q4_k" if n_gqa >= 4 else "q3_k", "q3_k_m": "q5_k" if i < 2 else "q4_k", "q3_k_l": "q5_k",
                "q4_k_m": "q6_k" if _more_bits(i, n) else None, "q5_k_m": "q6_k" if _more_bits(i, n) else None,
                "q4_k_s": "q5_k" if i < 4 else None}.get(ft)

    def down(i):
        return {"q2_k_m": "q3_k", "q3_k_m": "q5_k" if i < n // 16 else "q4_k", "q3_k_l": "q5_k",
                "q4_k_m": "q6_k" if _more_bits(i, n) else None, "q5_k_m": "q6_k" if _more_bits(i, n) else None,
                "q4_k_s": "q5_k" if i < n // 8 else None}.get(ft)

    def out(i):
        return {"q2_k_m": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ft)

    rules = [(("v_proj",), v), (("o_proj", "out_proj"), out), (("down_proj", "fc2"), down)]
    over = {}
    for name in layers:
        rule = next((r for suffixes, r in rules if name.endswith(suffixes)), None)
        for i in range(n):
            t = rule(i) if rule else None
            if t is not None and t != FILE_TYPES[ft]:
                over[f"{i}.{name}"] = t
    return over


def layer_type(kquant: str, in_features: int, name: str | None = None, overrides: dict | None = None,
               block: int | None = None) -> str | None:
    """The GGUF type a layer with ``in_features`` inputs gets under ``--kquant`` (or ``overrides``:
    ``"BLOCK.NAME"`` for one block, then ``"NAME"`` for every block, ``--kquant-type``); a k-quant falls
    back to its 32-column type where the inputs are not a multiple of 256; None if no type fits."""
    overrides = overrides or {}
    t = overrides.get(f"{block}.{name}") if block is not None else None
    t = t or overrides.get(name, base_type(kquant))
    kt = ktype(t)
    if in_features % kt.block == 0:
        return kt.name
    return FALLBACK[kt.name] if not kt.legacy and in_features % 32 == 0 else None
EMBEDDING_TYPES = ("auto", "float") + tuple(KTYPES)   # what --kquant-embedding accepts


def embedding_type(choice: str | None, cols: int) -> str | None:
    """The GGUF type of the token embedding / output head (``cols`` = hidden size) under
    ``--kquant-embedding``: ``auto`` (None) is llama.cpp's choice for the output head, Q6_K, or Q8_0 where
    the rows are not a multiple of 256; ``float`` keeps the source precision (returns None)."""
    choice = (choice or "auto").lower()
    if choice == "float":
        return None
    if choice == "auto":
        return "q6_k" if cols % QK_K == 0 else "q8_0"
    kt = ktype(choice)
    if cols % kt.block:
        raise ValueError(f"--kquant-embedding {kt.name}: the embedding's rows ({cols} columns) are not a multiple of "
                         f"{kt.block}; choose a 32-column type (q8_0, q5_0, q4_0) or auto")
    return kt.name


SHRINK = torch.linspace(1.0, 0.7, 13)   # range fractions tried per sub-block
STEPS = torch.arange(-4, 9) / 4.0        # levels added to the full range's scale (llama.cpp-like steps)


def ktype(name: str) -> KType:
    try:
        return KTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown k-quant type {name!r}; choose from {', '.join(KTYPES)}") from None


@dataclass
class KGrid:
    """One block's grid for every row: per-column ``scale`` and ``zero`` (the offset ``m`` for
    asymmetric types, the integer zero for symmetric ones), each ``(..., block)`` float32, and the
    stored fields: ``sc`` / ``m`` integer sub-scales / minimums ``(..., n_sub)``, ``d`` / ``dmin``
    float16 ``(...)`` (32-column types: ``d`` the scale, ``dmin`` the minimum itself)."""
    scale: torch.Tensor
    zero: torch.Tensor
    sc: torch.Tensor | None     # None for the 32-column types
    m: torch.Tensor | None
    d: torch.Tensor
    dmin: torch.Tensor | None


def _f16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16 -> float32, never exactly 0 (a zero super-scale would divide by zero)."""
    y = x.to(torch.float16)
    y = torch.where(y == 0, torch.full_like(y, 2.0 ** -24), y)
    return y.float()


def _ls_refit(x: torch.Tensor, q: torch.Tensor, imp: torch.Tensor, kt: KType, s0: torch.Tensor, m0):
    """Least-squares scale (and minimum) of a sub-block for fixed codes ``q``, weighted by ``imp``:
    ``min Σ imp (s q − m − x)²`` with ``m ≥ 0`` (asymmetric) or ``min Σ imp (s (q − z) − x)²``. Where the
    fit is degenerate (one distinct code) or gives a non-positive asymmetric scale, ``s0`` / ``m0`` stay."""
    if kt.offset:
        sw, sq, sqq = imp.sum(-1), (imp * q).sum(-1), (imp * q * q).sum(-1)
        sx, sqx = (imp * x).sum(-1), (imp * q * x).sum(-1)
        det = sw * sqq - sq * sq
        ok = det > 1e-12 * (sw * sqq).clamp_min(1e-30)
        safe = torch.where(ok, det, torch.ones_like(det))
        s = (sw * sqx - sq * sx) / safe
        b = (sqq * sx - sq * sqx) / safe            # x ≈ s q + b, b = −m
        s_b0 = sqx / sqq.clamp_min(1e-30)           # m ≥ 0 violated: the fit with m = 0
        s, m = torch.where(b > 0, s_b0, s), torch.where(b > 0, torch.zeros_like(b), -b)
        ok = ok & (s > 0)
        return torch.where(ok, s, s0), torch.where(ok, m, m0)
    c = q - kt.zero
    den = (imp * c * c).sum(-1)
    s = (imp * c * x).sum(-1) / den.clamp_min(1e-30)
    ok = (den > 0) & (s != 0)
    return torch.where(ok, s, s0), None


def _round_error(x: torch.Tensor, imp: torch.Tensor, kt: KType, s: torch.Tensor, m):
    """Codes of ``x`` (``(..., n_sub, sub)``) rounded onto the grid of sub-block scales ``s`` (and offsets
    ``m``, asymmetric types), and each sub-block's importance-weighted squared error."""
    maxq = 2 ** kt.bits - 1
    if kt.offset:
        q = torch.clamp(torch.round((x + m[..., None]) / s[..., None]), 0, maxq)
        return q, (imp * (s[..., None] * q - m[..., None] - x) ** 2).sum(-1)
    q = torch.clamp(torch.round(x / s[..., None]) + kt.zero, 0, maxq)
    return q, (imp * (s[..., None] * (q - kt.zero) - x) ** 2).sum(-1)


def _keep_better(best: dict, err: torch.Tensor, **values) -> None:
    """Per sub-block, keep ``values`` where ``err`` is below the best so far (``None`` values skipped)."""
    if not best:
        best.update(err=err, **values)
        return
    better = err < best["err"]
    best["err"] = torch.where(better, err, best["err"])
    for k, v in values.items():
        if v is not None:
            best[k] = torch.where(better, v, best[k])


def _sub_search(x: torch.Tensor, kt: KType, imp: torch.Tensor):
    """Per sub-block (``x``: ``(..., n_sub, sub)``), the float scale (and minimum) with the least
    importance-weighted squared error. Candidates: the range shrunk by each of ``SHRINK``, and scales
    stepped around the full range's (as llama.cpp's ``make_qkx3_quants`` / ``make_qx_quants`` step the
    inverse scale); each candidate's codes then get their least-squares scale (and minimum), and every
    grid is judged after rounding onto it (so the refit never loses to the candidate it came from)."""
    maxq = 2 ** kt.bits - 1
    if kt.offset:
        lo0 = torch.clamp(x.amin(-1), max=0)
        hi0 = torch.clamp(x.amax(-1), min=0)
        rng = hi0 - lo0
        rng = torch.where(rng > 0, rng, torch.ones_like(rng))
        trials = [(p * rng / maxq, -lo0 * p) for p in SHRINK.tolist()]
        trials += [(rng / (maxq + k), -lo0) for k in STEPS.tolist()]
    else:   # the largest magnitude maps to the extra negative level -zero
        big = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))[..., 0]
        big = torch.where(big != 0, big, torch.ones_like(big))
        trials = [(-big * p / kt.zero, None) for p in SHRINK.tolist()]
        trials += [(-big / (kt.zero + k / 2), None) for k in STEPS.tolist()]
    best = {}
    for s, m in trials:
        q, err = _round_error(x, imp, kt, s, m)
        _keep_better(best, err, s=s, m=m)
        s2, m2 = _ls_refit(x, q, imp, kt, s, m)
        _keep_better(best, _round_error(x, imp, kt, s2, m2)[1], s=s2, m=m2)
    return best["s"], best.get("m")


def _integer_neighbours(xs, imp, kt: KType, d, sc, dmin, mi):
    """Each sub-block's stored integers (scale, and minimum) moved by −1, 0 or +1 where that lowers the
    weighted error of the sub-block rounded onto the stored grid: rounding the float scale and minimum
    to integers separately is not the best integer pair, and at 2 bits the difference is large."""
    lo, hi = (1, kt.sc_max) if kt.offset else (-kt.sc_max - 1, kt.sc_max)
    best = {}
    for ds in (0, -1, 1):
        c = torch.clamp(sc + ds, lo, hi)
        if not kt.offset:
            c = torch.where(c == 0, sc, c)
        for dm in ((0, -1, 1) if kt.offset else (0,)):
            mm = torch.clamp(mi + dm, 0, kt.sc_max) if kt.offset else None
            err = _round_error(xs, imp, kt, d[..., None] * c, None if mm is None else dmin[..., None] * mm)[1]
            _keep_better(best, err, sc=c, mi=mm)
    return best["sc"], best.get("mi")


def superblock_grid(x: torch.Tensor, kt: KType | str, importance: torch.Tensor | None = None) -> KGrid:
    """The grid of one super-block (``x``: ``(..., 256)``), rounded to the format: sub-scales and
    minimums to their integers times float16 ``d`` / ``dmin``. ``importance`` (``(256,)`` or like
    ``x``, e.g. ``diag(H_col)``) weights the columns in the per-sub-block search."""
    kt = ktype(kt) if isinstance(kt, str) else kt
    if x.shape[-1] != kt.block:
        raise ValueError(f"a {kt.name} block has {kt.block} columns, got {x.shape[-1]}")
    x = x.float()
    n_sub = kt.block // kt.sub
    xs = x.reshape(*x.shape[:-1], n_sub, kt.sub)
    imp = torch.ones_like(xs) if importance is None else \
        importance.float().expand_as(x).reshape(xs.shape).clamp_min(0)
    s, m = _sub_search(xs, kt, imp)
    if kt.legacy:    # one block = one sub-block: its scale (and minimum) stored as float16 directly
        d = _f16(s[..., 0])
        if kt.offset:   # w = d q + min; as an offset grid zero = -min (negation is exact)
            mn = (-m[..., 0]).to(torch.float16)
            return KGrid(scale=d[..., None].expand(x.shape).contiguous(),
                         zero=(-mn.float())[..., None].expand(x.shape).contiguous(),
                         sc=None, m=None, d=d.to(torch.float16), dmin=mn)
        return KGrid(scale=d[..., None].expand(x.shape).contiguous(), zero=torch.full_like(x, float(kt.zero)),
                     sc=None, m=None, d=d.to(torch.float16), dmin=None)
    if kt.offset:
        d = _f16(s.amax(-1) / kt.sc_max)
        sc = torch.clamp(torch.round(s / d[..., None]), 1, kt.sc_max)
        mmax = m.amax(-1)
        dmin = _f16(torch.where(mmax > 0, mmax / kt.sc_max, torch.ones_like(mmax)))
        mi = torch.clamp(torch.round(m / dmin[..., None]), 0, kt.sc_max)
    else:
        d = _f16(s.abs().amax(-1) / kt.sc_max)
        sc = torch.clamp(torch.round(s / d[..., None]), -kt.sc_max - 1, kt.sc_max)
        sc = torch.where(sc == 0, torch.sign(s) + (s == 0), sc)    # never a zero scale
        mi, dmin = None, None
    sc, mi = _integer_neighbours(xs, imp, kt, d, sc, dmin, mi)
    if kt.offset:
        scale = d[..., None] * sc          # float32 products, as llama.cpp's dequantization forms them
        zero = dmin[..., None] * mi
    else:
        scale = d[..., None] * sc
        zero = torch.full_like(scale, float(kt.zero))
    rep = lambda t: t.repeat_interleave(kt.sub, dim=-1)  # noqa: E731
    return KGrid(scale=rep(scale), zero=rep(zero), sc=sc, m=mi, d=d.to(torch.float16),
                 dmin=None if dmin is None else dmin.to(torch.float16))


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kt: KType) -> torch.Tensor:
    """Codes (as floats) on a k-quant grid, exactly as llama.cpp's quantizer rounds."""
    maxq = 2 ** kt.bits - 1
    if kt.offset:
        return torch.clamp(torch.round((x + zero) / scale), 0, maxq)
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kt: KType) -> torch.Tensor:
    """``s q − m`` (asymmetric) or ``s (q − z)`` (symmetric), in llama.cpp's float32 arithmetic."""
    return scale * codes - zero if kt.offset else scale * (codes - zero)


def quantize_tensor(w: torch.Tensor, kt: KType | str) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Round a whole matrix ``(R, C)`` onto a GGUF type with no Hessian (the embedding / output head:
    each block's grid searched with equal column weights, as ``superblock_grid`` does for the solvers):
    ``(codes (R, C), stored fields {type, sc, m, d, dmin} per block, dequantized float32 weight)``.
    Deterministic: the same weight gives the same bytes (the pipeline's checkpoint and the GGUF writer
    each call it on the source weight)."""
    kt = ktype(kt) if isinstance(kt, str) else kt
    R, C = w.shape
    if C % kt.block:
        raise ValueError(f"{kt.name}: {C} columns are not a multiple of its {kt.block}-column blocks")
    x = w.float().reshape(R, C // kt.block, kt.block)
    codes, deq, fields = torch.empty_like(x), torch.empty_like(x), {"sc": [], "m": [], "d": [], "dmin": []}
    step = max(1, 2 ** 22 // C)            # rows per slice: bounded memory for a 150 k-row vocabulary
    for r0 in range(0, R, step):
        g = superblock_grid(x[r0:r0 + step], kt)
        q = quantize(x[r0:r0 + step], g.scale, g.zero, kt)
        codes[r0:r0 + step], deq[r0:r0 + step] = q, dequantize(q, g.scale, g.zero, kt)
        for k in fields:
            fields[k].append(getattr(g, k))
    fields = {k: (None if v[0] is None else torch.cat(v)) for k, v in fields.items()}
    return codes.reshape(R, C), {"type": kt.name, **fields}, deq.reshape(R, C)
