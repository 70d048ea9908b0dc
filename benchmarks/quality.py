"""The quality benchmark, one for every model: methods x bit widths x calibration seeds, perplexity on
every evaluation text of the model's profile, resumable, two single-thread jobs at a time.

    python benchmarks/quality.py --profile smollm2-135m-ref --study mlprow --seeds 0,1      # a study
    python benchmarks/quality.py --profile smollm2-135m --study main --seeds 0,1 --bits 2   # the paper's protocol
    python benchmarks/quality.py --profile stories260K --study main                           # 5 seeds
    python benchmarks/quality.py --profile smollm2-135m-ref --report                          # tables (+ plot)
    python benchmarks/quality.py --profile smollm2-135m-fast --report --study paper           # + the study's matrix

Profiles (``PROFILES``) fix what belongs to a model: its checkpoint, calibration text, evaluation
texts, sequence length, calibration windows and how many evaluation windows are read:

* ``smollm2-135m`` -- the real LLM that decides quality (built by ``../shared/models/smollm2-135m/build.py``
  into ``~/.cache/lowmem_boa/smollm2-135m`` or ``$LOWMEM_BOA_SMOLLM2``): the paper's protocol, 128 x 2048
  WikiText-2 train calibration, perplexity at 2048 on WikiText-2 test and on C4 (the shared 1,025
  validation documents, GPTQ's C4 protocol: first 256 windows).
* ``smollm2-135m-fast`` -- the paper's calibration (128 x 2048), perplexity on the first 32 windows of
  2048 of each text (~130 k tokens: ~8 min of one core at the ~285 tokens/s measured for the reference
  recipe's evaluation; the full protocol's ~800 k tokens take ~3/4 h per run).
* ``smollm2-135m-ref`` -- the same model with the reference recipe of issue 16's tables (32 x 512
  WikiText-2 calibration, first 64 windows of 512 of WikiText-2 test and of C4): screening.
* ``stories260K`` -- tiny and fragile (head_dim 8): 128 x 512 from ``tinystories/train.txt``, all 387
  validation windows of 512.
* ``llama-wt2-9m``, ``opt-wt2-10m`` -- trained here on WikiText-2, robust: code paths, WikiText-2 / PTB / C4.

Bit widths are written ``2``, ``3`` (per channel) or ``3g128`` (groups of 128). Each run goes through
``run_quant.py``'s own code path (``lowmem_boa.cli.quant.main``) in a worker process with one thread
(``--jobs`` at a time; two single-thread jobs use both cores without slowing each other), then every
evaluation text is read by the same streaming evaluator. With ``--errors N`` the per-block output
errors (attention output, whole block, every linear layer on its own original input) are measured on
the first N windows of every evaluation text (``lowmem_boa.eval.attention_output_errors``).

Results go to ``benchmarks/results/quality_<profile>.json`` (``--out`` to choose), appended run by run:
an interrupted study resumes where it stopped -- rows already present are not recomputed, and a run
killed halfway resumes inside run_quant (its output directory keeps the finished blocks). Evaluation
texts are only ever evaluated, never used to choose anything inside a run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLMC_VENV = REPO / "benchmarks" / "_work" / "venv-llmc"
EVAL_BUDGET = 3 * 2 ** 30   # per evaluating process: two jobs side by side fit the 24 GiB machine


def smollm2_dir() -> Path:
    return Path(os.environ.get("LOWMEM_BOA_SMOLLM2", Path.home() / ".cache" / "lowmem_boa" / "smollm2-135m"))


# a text is ("dataset", split) read from ../shared/data, or ("file", path under ../shared/data)
PROFILES = {
    "smollm2-135m": dict(model=smollm2_dir, calib=("wikitext2", "train"), seqlen=2048, nsamples=128,
                         evals={"wikitext2": ("wikitext2", "test"), "c4": ("c4", "valid")}, eval_windows=None),
    "smollm2-135m-fast": dict(model=smollm2_dir, calib=("wikitext2", "train"), seqlen=2048, nsamples=128,
                              evals={"wikitext2": ("wikitext2", "test"), "c4": ("c4", "valid")}, eval_windows=32,
                              runs="smollm2-135m"),
    "smollm2-135m-ref": dict(model=smollm2_dir, calib=("wikitext2", "train"), seqlen=512, nsamples=32,
                             evals={"wikitext2": ("wikitext2", "test"), "c4": ("c4", "valid")}, eval_windows=64),
    "stories260K": dict(model="stories260K", calib=("file", "tinystories/train.txt"), seqlen=512, nsamples=128,
                        evals={"tinystories": ("file", "tinystories/validation.txt")}, eval_windows=None),
    "llama-wt2-9m": dict(model="llama-wt2-9m", calib=("wikitext2", "train"), seqlen=512, nsamples=128,
                         evals={"wikitext2": ("wikitext2", "test"), "ptb": ("ptb", "test"), "c4": ("c4", "valid")},
                         eval_windows=None),
    "opt-wt2-10m": dict(model="opt-wt2-10m", calib=("wikitext2", "train"), seqlen=512, nsamples=128,
                        evals={"wikitext2": ("wikitext2", "test"), "ptb": ("ptb", "test"), "c4": ("c4", "valid")},
                        eval_windows=None),
}

# variant name -> run_quant.py flags (besides model/bits/seed/nsamples/calibration). Every variant runs on
# top of OLD_SOLVER, the solver before issue 17's corrections, so a name means what it meant when its
# rows were measured; the corrections are spelled out where a variant uses them. Without "mlprow" a BoA
# row is the paper's BoA (attention only); "boa-default" is the BoA default before issue 17 (MLP row
# Hessians at <= 3 bits), "boa-turbo" the corrections of issue 17 (default for a while), "boa-turbo-auto" the
# default since its speed options (joint rows, coarse grid search; = "boa-turbo-fast" on SmolLM2, whose
# heads have 64 rows), "gptq-turbo" GPTQ's default since issue 17.
OLD_SOLVER = ["--no-fp-targets", "--fp-alpha", "1", "--refine-scales", "0", "--no-follow-grids", "--joint-rows", "1",
              "--grid-coarse", "1", "--no-residual-weights", "--fp-max-shift", "0"]
VARIANTS = {
    "rtn": ["--method", "rtn", "--qparam", "minmax"],
    "gptq": ["--method", "gptq"],
    "gptq-minmax": ["--method", "gptq", "--qparam", "minmax"],
    "gptq-seq": ["--method", "gptq", "--true-sequential"],
    "gptq-seq-damp03": ["--method", "gptq", "--true-sequential", "--percdamp", "0.03"],
    "gptq-seq-damp10": ["--method", "gptq", "--true-sequential", "--percdamp", "0.1"],
    "gptq-damp03": ["--method", "gptq", "--percdamp", "0.03"],
    "gptq-damp10": ["--method", "gptq", "--percdamp", "0.1"],
    "boa-default": ["--method", "boa"],
    "boa-default-seq": ["--method", "boa", "--true-sequential"],
    "boa-default-search": ["--method", "boa", "--search-orders"],
    "boa": ["--method", "boa", "--no-mlp-row-hessian"],
    "boa-noblockv": ["--method", "boa", "--no-block-v", "--no-mlp-row-hessian"],
    "boa-novrow": ["--method", "boa", "--no-v-row-hessian", "--no-mlp-row-hessian"],   # the official code's configuration
    "boa-seq": ["--method", "boa", "--true-sequential", "--no-mlp-row-hessian"],
    "boa-seq-novrow": ["--method", "boa", "--true-sequential", "--no-v-row-hessian", "--no-mlp-row-hessian"],
    "boa-seq-damp03": ["--method", "boa", "--true-sequential", "--percdamp", "0.03", "--no-mlp-row-hessian"],
    "boa-seq-damp10": ["--method", "boa", "--true-sequential", "--percdamp", "0.1", "--no-mlp-row-hessian"],
    "boa-damp03": ["--method", "boa", "--percdamp", "0.03", "--no-mlp-row-hessian"],
    "boa-damp10": ["--method", "boa", "--percdamp", "0.1", "--no-mlp-row-hessian"],
    "boa+col": ["--method", "boa", "--act-order-col", "--no-mlp-row-hessian"],
    "boa+row": ["--method", "boa", "--act-order-row", "--no-mlp-row-hessian"],
    "boa+col+row": ["--method", "boa", "--act-order-col", "--act-order-row", "--no-mlp-row-hessian"],
    "boa-search": ["--method", "boa", "--search-orders", "--no-mlp-row-hessian"],
    "gptq+col": ["--method", "gptq", "--act-order-col"],
    "gptq-search": ["--method", "gptq", "--search-orders"],
    "gptq-fpt": ["--method", "gptq", "--fp-targets"],
    "boa-fpt": ["--method", "boa", "--fp-targets", "--no-mlp-row-hessian"],
    "boa-mlprow": ["--method", "boa", "--mlp-row-hessian"],
    "boa-mlprow-g32": ["--method", "boa", "--mlp-row-hessian", "--mlp-row-group", "32"],
    "boa-mlprow-rd01": ["--method", "boa", "--mlp-row-hessian", "--mlp-row-damp", "0.1"],
    "boa-mlprow-rd1": ["--method", "boa", "--mlp-row-hessian", "--mlp-row-damp", "1"],
    "boa-mlprow-full": ["--method", "boa", "--mlp-row-hessian", "--mlp-row-group", "100000"],
    "boa-mlprow-search": ["--method", "boa", "--mlp-row-hessian", "--search-orders"],
    # issue 17's corrections: alpha-scaled fp targets (GPTAQ/TurboBoA alpha 0.25), refined scales,
    # BoA grids that follow the updated rows
    "gptq-rs": ["--method", "gptq", "--refine-scales", "1"],
    "gptq-fpa": ["--method", "gptq", "--fp-targets", "--fp-alpha", "0.25"],
    "gptq-turbo": ["--method", "gptq", "--fp-targets", "--fp-alpha", "0.25", "--refine-scales", "1"],
    "boa-rs": ["--method", "boa", "--refine-scales", "1"],
    "boa-follow-rs": ["--method", "boa", "--follow-grids", "--refine-scales", "1"],
    "boa-fpa": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25"],
    "boa-turbo": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids", "--refine-scales", "1"],
    "boa-turbo-fast": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids", "--refine-scales", "1",
                       "--joint-rows", "16", "--grid-coarse", "8"],
    "boa-turbo-nofollow": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--no-follow-grids",
                           "--refine-scales", "1", "--joint-rows", "auto", "--grid-coarse", "8"],
    "boa-default-fast": ["--method", "boa", "--joint-rows", "16", "--grid-coarse", "8"],   # speed options alone
    "boa-turbo-auto": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids", "--refine-scales", "1",
                       "--joint-rows", "auto", "--grid-coarse", "8"],   # = boa-turbo-fast where heads have >= 64 rows
    # alpha of the fp targets (issue 17: chosen by measurement), on top of the defaults
    **{f"boa-turbo-a{a}": ["--method", "boa", "--fp-targets", "--fp-alpha", a, "--follow-grids", "--refine-scales", "1",
                           "--joint-rows", "auto", "--grid-coarse", "8"] for a in ("0.1", "0.5", "1")},
    **{f"gptq-turbo-a{a}": ["--method", "gptq", "--fp-targets", "--fp-alpha", a, "--refine-scales", "1"]
       for a in ("0.1", "0.5", "1")},
    "gptq-turbo-col": ["--method", "gptq", "--fp-targets", "--fp-alpha", "0.25", "--refine-scales", "1",
                       "--act-order-col"],
    "gptq-turbo-search": ["--method", "gptq", "--fp-targets", "--fp-alpha", "0.25", "--refine-scales", "1",
                          "--search-orders"],
    "gptq-turbo-fast": ["--method", "gptq", "--fp-targets", "--fp-alpha", "0.25", "--refine-scales", "1",
                        "--grid-coarse", "8"],
    "boa-paper-turbo": ["--method", "boa", "--no-mlp-row-hessian", "--fp-targets", "--fp-alpha", "0.25",
                        "--follow-grids", "--refine-scales", "1"],
    # issue 16's defaults re-decided on top of today's default BoA (boa-turbo-auto): one change each
    **{f"boa-turbo-{k}": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids",
                          "--refine-scales", "1", "--joint-rows", "auto", "--grid-coarse", "8", *extra]
       for k, extra in {"noblockv": ["--no-block-v"], "nomlprow": ["--no-mlp-row-hessian"],
                        "search": ["--search-orders"], "damp03": ["--percdamp", "0.03"],
                        "damp10": ["--percdamp", "0.1"], "g64": ["--mlp-row-group", "64"],
                        "gfull": ["--mlp-row-group", "100000"]}.items()},
    # --residual-weights (the MLP-output layer's tokens weighted by 1 / the block output's mean square) on
    # today's defaults
    "gptq-turbo-rw": ["--method", "gptq", "--fp-targets", "--fp-alpha", "0.25", "--refine-scales", "1",
                      "--residual-weights"],
    "boa-turbo-auto-rw": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids", "--refine-scales",
                          "1", "--joint-rows", "auto", "--grid-coarse", "8", "--residual-weights"],
    # --fp-max-shift 1 (a layer with ||W' - W|| > alpha ||W|| also solved on the bounded target; the lower
    # objective wins) on today's defaults
    "gptq-turbo-cap": ["--method", "gptq", "--fp-targets", "--fp-alpha", "0.25", "--refine-scales", "1",
                       "--fp-max-shift", "1"],
    "boa-turbo-auto-cap": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids", "--refine-scales",
                           "1", "--joint-rows", "auto", "--grid-coarse", "8", "--fp-max-shift", "1"],
    # the same with MLP row groups of 512 and block_v: BoA's 3-bit default before act-order ("-g512"), and with
    # act-order (column + row, "-g512-colrow"): BoA's 3-bit default since that A/B
    **{f"boa-turbo-auto-cap-g512{k}": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids",
                                       "--refine-scales", "1", "--joint-rows", "auto", "--grid-coarse", "8",
                                       "--fp-max-shift", "1", "--block-v", "--mlp-row-group", "512", *extra]
       for k, extra in {"": [], "-colrow": ["--act-order-col", "--act-order-row"],
                        # the 3-bit default without MLP row Hessians (their A/B at 3 bits)
                        "-colrow-nomlprow": ["--act-order-col", "--act-order-row", "--no-mlp-row-hessian"]}.items()},
    # BoA's default since block_v went off (decided at the paper's protocol): the guard, no block_v; and the
    # defaults still open re-decided on top of it, one change each
    **{f"boa-turbo-auto-cap-nbv{k}": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids",
                                      "--refine-scales", "1", "--joint-rows", "auto", "--grid-coarse", "8",
                                      "--fp-max-shift", "1", "--no-block-v", *extra]
       for k, extra in {"": [], "-g64": ["--mlp-row-group", "64"], "-g512": ["--mlp-row-group", "512"],
                        "-gfull": ["--mlp-row-group", "100000"],
                        "-search": ["--search-orders"], "-nomlprow": ["--no-mlp-row-hessian"],
                        "-rw": ["--residual-weights"], "-col": ["--act-order-col"],
                        "-colrow": ["--act-order-col", "--act-order-row"],
                        "-g512-colrow": ["--mlp-row-group", "512", "--act-order-col", "--act-order-row"],
                        # the open 2-bit A/Bs again on today's 2-bit default (-g512-colrow): residual weights, and
                        # no MLP row Hessians (the group size does not matter then)
                        "-g512-colrow-rw": ["--mlp-row-group", "512", "--act-order-col", "--act-order-row",
                                            "--residual-weights"],
                        "-colrow-nomlprow": ["--act-order-col", "--act-order-row", "--no-mlp-row-hessian"]}.items()},
    # BoA's 3-bit default (block_v, act-order) with MLP row groups of 128 instead of 512: the group-size A/B with
    # act-order at 3 bits (its 2-bit twin is "boa-turbo-auto-cap-nbv-colrow")
    "boa-turbo-auto-cap-colrow": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids",
                                  "--refine-scales", "1", "--joint-rows", "auto", "--grid-coarse", "8",
                                  "--fp-max-shift", "1", "--block-v", "--mlp-row-group", "128", "--act-order-col",
                                  "--act-order-row"],
    # --block-v-targets (V's fp target from its own attention-weighted cross statistics) on today's defaults
    "boa-turbo-bvt": ["--method", "boa", "--fp-targets", "--fp-alpha", "0.25", "--follow-grids", "--refine-scales",
                      "1", "--joint-rows", "auto", "--grid-coarse", "8", "--block-v-targets"],
    "llmc-gptq": None,   # llm-compressor's GPTQModifier in its own virtualenv (benchmarks/llmc_gptq.py)
}
# block_v was on by default until the paper's protocol turned it off (docs/results.md, "block_v at the paper's
# protocol"): every BoA variant that relied on that default says --block-v, so its name keeps the meaning of its
# rows; "boa-turbo-auto-cap-nbv" is BoA's default since that change
# The same for --mlp-row-group, 128 until SmolLM2's A/B made 512 the default: "boa-turbo-auto-cap-nbv-g512" is
# BoA's 2-bit default since then. And for act-order (--act-order-col/-row), off until the same A/B at the paper's
# protocol made it BoA's 2-bit default: "boa-turbo-auto-cap-nbv-g512-colrow" is BoA's 2-bit default since then;
# column act-order became GPTQ's 2-bit default after its A/B at the reference recipe: "gptq-turbo-col" is GPTQ's
# 2-bit default since then (and its 3-bit default after the same A/B at 3 bits); at 3 bits the same A/B made
# "boa-turbo-auto-cap-g512-colrow" BoA's default (and its default with groups of 128 at 3 and 4 bits after the
# 3g128 and 4g128 A/Bs, and at 4 bits per channel after the 4-bit A/B, as "gptq-turbo-col" GPTQ's).
for _flags in VARIANTS.values():
    if _flags and _flags[:2] == ["--method", "boa"] and not {"--block-v", "--no-block-v"} & set(_flags):
        _flags.append("--block-v")
    if _flags and _flags[:2] == ["--method", "boa"] and "--mlp-row-group" not in _flags:
        _flags += ["--mlp-row-group", "128"]
    # act-order: off in every row measured before SmolLM2's A/Bs made it the 2-bit default (BoA: col + row; GPTQ: col)
    for _order, _methods in (("col", ("boa", "gptq")), ("row", ("boa",))):
        if _flags and _flags[0] == "--method" and _flags[1] in _methods and "--search-orders" not in _flags \
                and not {f"--act-order-{_order}", f"--no-act-order-{_order}"} & set(_flags):
            _flags.append(f"--no-act-order-{_order}")

STUDIES = {
    "main": {"bits": ["2", "3", "4"], "variants": ["rtn", "gptq-minmax", "llmc-gptq", "gptq", "boa", "boa-noblockv",
                                                   "boa-mlprow"], "nsamples": [None]},
    # issue 16's protocol matrix: RTN, llm-compressor's GPTQ, GPTQ before/after issue 17 (gptq, gptq-turbo) and
    # GPTQ's default (gptq-turbo-col at every width of the matrix), the paper's BoA, our BoA before issue 17,
    # earlier defaults (boa-turbo-auto, boa-turbo-auto-cap-nbv, and boa-turbo-auto-cap-g512 before act-order with
    # groups of 128) and today's BoA defaults: at 2 bits boa-turbo-auto-cap-nbv-g512-colrow, at 3 bits, 3g128 and
    # 4g128 boa-turbo-auto-cap-g512-colrow (tests/test_quality_benchmark.py checks each against the CLI's defaults)
    "paper": {"bits": ["2", "3", "3g128", "4g128"], "variants": ["rtn", "llmc-gptq", "gptq", "gptq-turbo",
                                                                 "gptq-turbo-col", "boa", "boa-default",
                                                                 "boa-turbo-auto", "boa-turbo-auto-cap-nbv",
                                                                 "boa-turbo-auto-cap-nbv-g512-colrow",
                                                                 "boa-turbo-auto-cap-g512-colrow",
                                                                 "boa-turbo-auto-cap-g512",
                                                                 # the 2-bit default with MLP row groups of 128
                                                                 # (the group-size A/B with act-order)
                                                                 "boa-turbo-auto-cap-nbv-colrow"],
              "nsamples": [None]},
    "ab": {"bits": ["2"], "variants": ["gptq-seq", "gptq", "boa-seq", "boa", "boa-seq-novrow", "boa-novrow",
                                       "gptq-seq-damp03", "boa-seq-damp03", "gptq-seq-damp10", "boa-seq-damp10"],
           "nsamples": [None]},
    "orders": {"bits": ["2"], "variants": ["boa", "boa+col", "boa+row", "boa+col+row", "boa-search", "gptq", "gptq+col",
                                           "gptq-search"], "nsamples": [None]},
    "calib": {"bits": ["2"], "variants": ["gptq", "boa"], "nsamples": [128, 256, 512]},
    "fpt": {"bits": ["2"], "variants": ["gptq", "boa", "gptq-fpt", "boa-fpt"], "nsamples": [None]},
    "mlprow": {"bits": ["2", "3", "4"], "variants": ["gptq", "boa", "boa-mlprow", "boa-mlprow-full", "boa-mlprow-search"],
               "nsamples": [None]},
    "defaults": {"bits": ["2"], "variants": ["gptq", "boa-default", "boa", "gptq-seq", "boa-default-seq",
                                             "boa-mlprow-rd1", "boa-default-search", "boa-noblockv", "gptq-damp03",
                                             "boa-damp03"], "nsamples": [None]},
    "turbo": {"bits": ["2"], "variants": ["gptq", "boa-default", "gptq-turbo", "boa-turbo", "gptq-rs", "gptq-fpa",
                                          "boa-rs", "boa-follow-rs", "boa-fpa", "boa-paper-turbo", "boa-turbo-fast",
                                          "gptq-turbo-fast", "boa-turbo-auto", "boa-default-fast", "boa-turbo-nofollow", "boa-turbo-a0.1", "boa-turbo-a0.5",
                                          "boa-turbo-a1", "gptq-turbo-a0.1", "gptq-turbo-a0.5", "gptq-turbo-a1"], "nsamples": [None]},
    "defaults2": {"bits": ["2"], "variants": ["boa-turbo-auto", "gptq-turbo", "boa-turbo-noblockv", "boa-turbo-nomlprow",
                                              "boa-turbo-search", "boa-turbo-damp03", "boa-turbo-damp10", "boa-turbo-g64",
                                              "boa-turbo-gfull", "gptq-turbo-rw", "boa-turbo-auto-rw",
                                              "gptq-turbo-cap", "boa-turbo-auto-cap", "boa-turbo-bvt",
                                              "boa-turbo-auto-cap-nbv", "boa-turbo-auto-cap-nbv-g64",
                                              "boa-turbo-auto-cap-nbv-gfull", "boa-turbo-auto-cap-nbv-search",
                                              "boa-turbo-auto-cap-nbv-nomlprow", "boa-turbo-auto-cap-nbv-rw",
                                              "boa-turbo-auto-cap-nbv-g512", "boa-turbo-auto-cap-nbv-col",
                                              "boa-turbo-auto-cap-nbv-colrow", "gptq-turbo-col", "gptq-turbo-search",
                                              "boa-turbo-auto-cap-nbv-g512-colrow", "boa-turbo-auto-cap-g512-colrow",
                                              "boa-turbo-auto-cap-g512-colrow-nomlprow",
                                              "boa-turbo-auto-cap-nbv-g512-colrow-rw",
                                              "boa-turbo-auto-cap-nbv-colrow-nomlprow"],
                  "nsamples": [None]},
    "damp": {"bits": ["2"], "variants": ["gptq", "boa", "gptq-damp03", "boa-damp03", "gptq-damp10", "boa-damp10"],
             "nsamples": [None]},
}


def bits_flags(spec: str) -> list[str]:
    """``"3g128"`` -> ``--wbits 3 --group-size 128``."""
    bits, _, group = str(spec).partition("g")
    return ["--wbits", bits] + (["--group-size", group] if group else [])


def llmc_bits(spec: str) -> list[str]:
    """``"3g128"`` -> ``--bits 3 --group-size 128`` (benchmarks/llmc_gptq.py)."""
    return ["--bits" if f == "--wbits" else f for f in bits_flags(spec)]


def llmc_unsupported(mdir: Path, spec: str) -> str | None:
    """Why llm-compressor 0.14 cannot quantize this model at this bit spec, or None. In groups it needs every
    quantized layer's input width to be a multiple of the group size: its check refuses the model otherwise,
    and with ``bypass_divisibility_checks=True`` its MinMax observer fails (it reshapes a row into groups).
    SmolLM2-135M (d = 576 = 4.5 x 128) cannot be done in groups of 128. Read from the checkpoint's
    safetensors headers (no weights loaded)."""
    from safetensors import safe_open
    group = int(str(spec).partition("g")[2] or 0)
    if not group:
        return None
    widths = set()
    for f in sorted(Path(mdir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                shape = sf.get_slice(k).get_shape() if ".layers." in k and k.endswith(".weight") else []
                if len(shape) == 2 and shape[1] % group:
                    widths.add(shape[1])
    if not widths:
        return None
    return (f"llm-compressor 0.14 quantizes in groups only layers whose input width is a multiple of the group "
            f"size; this model has input widths {', '.join(map(str, sorted(widths)))} (not multiples of {group})")


def llmc_na(profile: dict, shared: Path, variants: list[str], bits: list[str]) -> dict:
    """``{bits: reason}`` of the ``llmc-gptq`` cells llm-compressor cannot do on the profile's model."""
    mdir = model_dir(profile, shared)
    if "llmc-gptq" not in variants or not mdir.is_dir():
        return {}
    return {b: why for b in bits if (why := llmc_unsupported(mdir, b))}


def resolve_text(shared: Path, text: tuple):
    from lowmem_boa.data import file_source, load_source
    kind, what = text
    if kind == "file":
        return file_source(shared / "data" / what)
    return load_source(kind, what, shared / "data")


def model_dir(profile: dict, shared: Path) -> Path:
    m = profile["model"]
    return Path(m()) if callable(m) else shared / "models" / m


_WINDOWS: dict = {}


def eval_sets(profile_name: str, shared: Path, max_windows: int | None = None) -> dict:
    """``{text: (n, seqlen) token windows}`` of the profile's evaluation texts (cached per process)."""
    key = (profile_name, max_windows)
    if key not in _WINDOWS:
        from transformers import AutoTokenizer
        from lowmem_boa.data import eval_windows
        p = PROFILES[profile_name]
        tok = AutoTokenizer.from_pretrained(model_dir(p, shared))
        n = p["eval_windows"] if max_windows is None else max_windows
        _WINDOWS[key] = {name: eval_windows(tok, resolve_text(shared, t), p["seqlen"], n)
                         for name, t in p["evals"].items()}
    return _WINDOWS[key]


def calib_flags(profile: dict, shared: Path) -> list[str]:
    kind, what = profile["calib"]
    if kind == "file":
        return ["--calib-file", str(shared / "data" / what)]
    assert what == "train", "run_quant calibrates on the train split"
    return ["--calib", kind, "--data-dir", str(shared / "data")]


def run_dir(work: Path, job: dict) -> Path:
    """Where a run's checkpoint lives. Profiles with the same calibration share it (``runs``): a
    checkpoint kept (``--keep``) by the fast screen is evaluated by the full protocol without
    quantizing again (run_quant finds the finished run and does no work)."""
    return work / PROFILES[job["profile"]].get("runs", job["profile"]) / f"{job['variant']}-w{job['bits']}-n{job['nsamples']}-s{job['seed']}"


def run_one(job: dict) -> dict:
    """Quantize one configuration and evaluate it (runs in a worker process). The variant ``fp``
    evaluates the unquantized model (the profile's baseline, a job like the others)."""
    import torch
    torch.set_num_threads(job["threads"])
    from lowmem_boa.eval import attention_output_errors, streaming_nll
    shared, work = Path(job["shared"]), Path(job["work"])
    profile = PROFILES[job["profile"]]
    mdir = model_dir(profile, shared)
    if job["variant"] == "fp":
        return {"variant": "fp", "ppl": {t: streaming_nll(mdir, w, torch.device("cpu"), EVAL_BUDGET)["ppl"]
                                         for t, w in eval_sets(job["profile"], shared).items()}}
    out = run_dir(work, job)
    t0 = time.perf_counter()
    report = {}
    if job["variant"] == "llmc-gptq":
        from transformers import AutoTokenizer
        from lowmem_boa.data import calibration_windows
        qdir = out / "model"
        if not (qdir / "config.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            ids = calibration_windows(AutoTokenizer.from_pretrained(mdir), resolve_text(shared, profile["calib"]),
                                      job["nsamples"], profile["seqlen"], job["seed"])
            torch.save(ids, out / "calib.pt")
            env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
            # llm-compressor's own progress (an hour or more per run at the paper's protocol on one thread, and
            # not resumable) goes to llmc.log beside the checkpoint, so a long run can be followed
            with open(out / "llmc.log", "w") as log:
                subprocess.run([str(LLMC_VENV / "bin" / "python"), str(REPO / "benchmarks" / "llmc_gptq.py"),
                                "--model", str(mdir), "--calib", str(out / "calib.pt"), *llmc_bits(job["bits"]),
                                "--out", str(qdir)], check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    else:
        from lowmem_boa.cli.quant import main as quant_main
        # no --overwrite: a run killed halfway resumes from its finished blocks (same configuration)
        argv = ["--model", str(mdir), *bits_flags(job["bits"]), "--seqlen", str(profile["seqlen"]),
                "--nsamples", str(job["nsamples"]), "--seed", str(job["seed"]), *calib_flags(profile, shared),
                "--device", "cpu", "--output", str(out), "--no-progress", *OLD_SOLVER, *VARIANTS[job["variant"]]]
        with contextlib.redirect_stdout(io.StringIO()):
            rc = quant_main(argv)
        if rc != 0:
            raise RuntimeError(f"run_quant {' '.join(argv)} exited {rc}")
        qdir = out
        report = json.loads((out / "quant_report.json").read_text())
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    sets = eval_sets(job["profile"], shared)
    cpu, budget = torch.device("cpu"), EVAL_BUDGET
    ppl = {}
    for name, w in sets.items():   # each text's result kept beside the run: a killed evaluation resumes
        done = out / f"eval_{name}_{w.shape[0]}x{w.shape[1]}.json"
        if not done.is_file():
            done.write_text(json.dumps(streaming_nll(qdir, w, cpu, budget)["ppl"]))
        ppl[name] = json.loads(done.read_text())
    row = {k: job[k] for k in ("variant", "bits", "seed", "nsamples")}
    row.update(ppl=ppl, quant_seconds=seconds, eval_seconds=time.perf_counter() - t1)
    if report:
        blocks = report["blocks"].items()
        row["layer_info"] = {i: {lay["name"]: {k: lay[k] for k in ("rel_error", "rel_attention_error")}
                                 for lay in b["layers"]} for i, b in blocks}
        row["phase_seconds"] = {i: b.get("phase_seconds") for i, b in blocks}
        # per block and per layer, summed over every session of a resumed run (quant_seconds is this one's)
        row["block_seconds"] = {i: b.get("seconds") for i, b in blocks}
        row["solve_seconds"] = {i: {lay["name"]: lay["seconds"] for lay in b["layers"]} for i, b in blocks}
        orders = {f"{i}.{lay['name']}": lay["info"].get("orders") for i, b in blocks
                  for lay in b["layers"] if lay["info"].get("orders")}
        if orders:
            row["orders"] = orders
        # --fp-targets: each layer's correction size ||W' - W|| / ||W||, and for a layer beyond --fp-max-shift
        # whether the bounded target won
        shifts = {f"{i}.{lay['name']}": [lay["info"]["fp_shift"], lay["info"].get("fp_bounded_kept")] for i, b in blocks
                  for lay in b["layers"] if "fp_shift" in lay["info"]}
        if shifts:
            row["fp_shift"] = shifts
    if job.get("errors"):
        # held out from calibration: the first windows of each evaluation text (evaluated, never selected on)
        row["errors"] = {name: attention_output_errors(mdir, qdir, w[: job["errors"]], cpu, budget)
                         for name, w in sets.items()}
    if not job.get("keep"):
        shutil.rmtree(out, ignore_errors=True)
    return row


def normalize(row: dict, profile: dict) -> dict:
    """Rows of the older stories260K benchmark (one text, integer bits) in this schema."""
    row = dict(row)
    row["bits"] = str(row["bits"])
    if not isinstance(row["ppl"], dict):
        row["ppl"] = {next(iter(profile["evals"])): row["ppl"]}
    if "attn_rel_error" in row and "errors" not in row:
        row["errors"] = {next(iter(profile["evals"])): [{"block": i, "rel_error": e}
                                                        for i, e in enumerate(row.pop("attn_rel_error"))]}
    return row


def summarize(rows: list[dict], texts: list[str]) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["variant"], r["bits"], r["nsamples"]), []).append(r)
    out = []
    for (variant, bits, ns), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        s = {"variant": variant, "bits": bits, "nsamples": ns, "seeds": [r["seed"] for r in rs],
             "quant_seconds": statistics.fmean(r["quant_seconds"] for r in rs)}
        for t in texts:
            p = [r["ppl"][t] for r in rs]
            s[t] = {"ppl": p, "mean": statistics.fmean(p), "std": statistics.stdev(p) if len(p) > 1 else 0.0,
                    "min": min(p), "max": max(p)}
        out.append(s)
    return out


def markdown(summary: list[dict], fp: dict, texts: list[str], ref: str = "gptq") -> str:
    """One row per (bits, windows, variant): per text the mean, std, per-seed values and the
    degradation ratio (mean - fp) / (ref mean - fp) against ``ref`` on the same seeds' mean."""
    head = "| bits | windows | variant | seeds | " + " | ".join(
        f"{t} mean ± std | per seed | ratio vs {ref}" for t in texts) + " | s/run |"
    lines = [head, "|" + "---|" * (5 + 3 * len(texts))]
    for s in sorted(summary, key=lambda s: (s["bits"], s["nsamples"], s[texts[0]]["mean"])):
        g = next((t for t in summary if t["variant"] == ref and t["bits"] == s["bits"]
                  and t["nsamples"] == s["nsamples"]), None)
        cells = []
        for t in texts:
            m = s[t]
            ratio = f"{(m['mean'] - fp[t]) / (g[t]['mean'] - fp[t]):.3f}" if g and g["seeds"] == s["seeds"] else "–"
            cells.append(f"{m['mean']:.3f} ± {m['std']:.3f} | {' / '.join(f'{p:.2f}' for p in m['ppl'])} | {ratio}")
        lines.append(f"| {s['bits']} | {s['nsamples']} | {s['variant']} | {','.join(map(str, s['seeds']))} | "
                     + " | ".join(cells) + f" | {s['quant_seconds']:.0f} |")
    return "\n".join(lines)


def matrix(summary: list[dict], fp: dict, texts: list[str], variants: list[str], bits: list[str],
           nsamples: int, impossible: set | None = None) -> str:
    """A study's plan as a table, measured or not: one row per variant (the study's order), one column per
    bit width; a cell is each text's mean over the seeds measured with ``nsamples`` calibration windows,
    and the seeds. "–" marks a cell not yet measured, so a half-finished matrix says what is left; "n/a"
    a ``(variant, bits)`` cell in ``impossible`` (a tool that cannot do it on this model)."""
    lines = ["fp: " + (" / ".join(f"{fp[t]:.3f}" for t in texts) if fp else "not measured"), "",
             "| variant | " + " | ".join(bits) + " |", "|---|" + "---|" * len(bits)]
    for v in variants:
        cells = []
        for b in bits:
            s = next((s for s in summary if s["variant"] == v and s["bits"] == b and s["nsamples"] == nsamples), None)
            if s is None and (v, b) in (impossible or set()):
                cells.append("n/a")
                continue
            cells.append("–" if s is None else " / ".join(f"{s[t]['mean']:,.2f}" for t in texts)
                         + f" (seed{'s' if len(s['seeds']) > 1 else ''} {','.join(map(str, s['seeds']))})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def errors_table(runs: list[dict], text: str, key: str = "rel_error", ref: str = "gptq") -> str:
    """Per (bits, variant): a per-block error (``key``) on ``text`` averaged over seeds, and / ``ref``."""
    acc: dict = {}
    for r in runs:
        e = r.get("errors", {}).get(text)
        if e and key in e[0]:
            acc.setdefault((r["bits"], r["variant"]), []).append([b[key] for b in e])
    mean = {k: [statistics.fmean(col) for col in zip(*v)] for k, v in acc.items()}
    lines = [f"| bits | variant | seeds | {key} on {text}: mean of blocks | / {ref} (mean of blocks) | blocks below "
             f"{ref} | per block (mean over seeds) | / {ref} per block |", "|---|---|---|---|---|---|---|---|"]
    for (bits, variant), m in sorted(mean.items()):
        g = mean.get((bits, ref)) if variant != ref else None
        ratios = [a / b for a, b in zip(m, g)] if g else []
        lines.append(f"| {bits} | {variant} | {len(acc[(bits, variant)])} | {statistics.fmean(m):.4f} | "
                     + (f"{statistics.fmean(m) / statistics.fmean(g):.3f} | {sum(r < 1 for r in ratios)}/{len(m)}"
                        if g else "– | –")
                     + " | " + " / ".join(f"{e:.4f}" for e in m) + " | "
                     + (" / ".join(f"{r:.3f}" for r in ratios) or "–") + " |")
    return "\n".join(lines)


def phases_table(runs: list[dict]) -> str:
    """Per (bits, variant): quantization seconds per phase, summed over blocks and averaged over the
    seeds that recorded them; ``solve`` sums the layers' solver seconds (rows that recorded them),
    ``total − statistics`` is the solves plus everything not in a statistics phase."""
    acc: dict = {}
    for r in runs:
        ph = r.get("phase_seconds")
        if not ph or not all(ph.values()):
            continue
        tot: dict = {}
        for blk in ph.values():
            for k, v in blk.items():
                tot[k] = tot.get(k, 0.0) + v
        stats = sum(tot.values())
        if r.get("solve_seconds"):
            tot["solve"] = sum(v for blk in r["solve_seconds"].values() for v in blk.values())
        # a resumed run's quant_seconds is its last session's: the blocks' own seconds where recorded
        # a block's own seconds cover its statistics and solves; its propagation runs after them
        total = (sum(r["block_seconds"].values()) + tot.get("propagate (block forward)", 0.0)
                 if r.get("block_seconds") else r["quant_seconds"])
        if total >= stats:      # not a row re-evaluated from a checkpoint quantized earlier
            tot["total"], tot["total − statistics"] = total, total - stats
        acc.setdefault((r["bits"], r["variant"]), []).append(tot)
    names = sorted({k for v in acc.values() for t in v for k in t}, key=lambda k: (k.startswith("total"), k == "solve", k))
    lines = ["| bits | variant | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for (bits, variant), ts in sorted(acc.items()):
        cells = [f"{statistics.fmean(t[n] for t in ts if n in t):.0f}" if any(n in t for t in ts) else "–"
                 for n in names]
        lines.append(f"| {bits} | {variant} | {len(ts)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_errors_table(runs: list[dict], text: str, variants: list[str], bits: str) -> str:
    """Per linear layer (summed over blocks, mean over seeds): the out-of-domain layer error
    ``||(Q-W)x||^2/||Wx||^2`` on ``text`` of each variant, and the ratio of each to the first."""
    per: dict = {}
    for r in runs:
        e = r.get("errors", {}).get(text)
        if r["bits"] == bits and r["variant"] in variants and e and "layers" in e[0]:
            per.setdefault(r["variant"], []).append(e)
    if not per:
        return f"(no per-layer errors on {text})"
    names = list(next(iter(per.values()))[0][0]["layers"])
    lines = [f"| layer (mean over blocks) on {text} | " + " | ".join(variants) + " |", "|" + "---|" * (1 + len(variants))]
    for n in names:
        vals = [statistics.fmean(statistics.fmean(b["layers"][n] for b in e) for e in per[v]) if v in per else None
                for v in variants]
        lines.append(f"| {n} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], fp: dict, texts: list[str], title: str, path: Path) -> None:
    """Mean perplexity (markers) and seed range (bars) per variant and bit width, per text, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False)
    variants = sorted({s["variant"] for s in summary})
    bit_specs = sorted({s["bits"] for s in summary}, key=lambda b: (int(str(b).split("g")[0]), b))
    for ax, t in zip(axes[0], texts):
        for k, v in enumerate(variants):
            rows = [s for s in summary if s["variant"] == v and s["nsamples"] == summary[0]["nsamples"]]
            rows = sorted(rows, key=lambda s: bit_specs.index(s["bits"]))
            if not rows:
                continue
            x = [bit_specs.index(s["bits"]) + (k - len(variants) / 2) * 0.05 for s in rows]
            m = [s[t] for s in rows]
            ax.errorbar(x, [a["mean"] for a in m], yerr=[[a["mean"] - a["min"] for a in m],
                                                         [a["max"] - a["mean"] for a in m]],
                        marker="o", capsize=3, label=v)
        ax.axhline(fp[t], color="gray", ls="--", lw=0.8, label=f"fp {fp[t]:.2f}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(bit_specs)), bit_specs)
        ax.set_xlabel("weight bits (gN: groups of N)")
        ax.set_ylabel(f"{t} perplexity (mean, seed min-max)")
        ax.set_title(f"{title}: {t}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_measured(cmd: list[str], cwd: Path = REPO) -> dict:
    """Run ``cmd``; wall time and the peak RSS of the process (polled every 50 ms)."""
    import psutil
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-4000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak, "stdout": out}


def ensure_llmc_venv() -> Path:
    py = LLMC_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "llmcompressor==0.14.0.1"], check=True)
    return py


def load_results(path: Path, profile: dict) -> dict:
    data = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    data["runs"] = [normalize(r, profile) for r in data["runs"]]
    if "fp32" in data and "fp" not in data:     # the older stories260K files
        data["fp"] = {next(iter(profile["evals"])): data.pop("fp32")}
    return data


def run_key(row: dict) -> tuple:
    """What identifies a run in a results file."""
    return row["variant"], row["bits"], row["seed"], row["nsamples"]


def save_result(path: Path, profile: dict, data: dict, row: dict | None) -> dict:
    """Add ``row`` (or the fp baseline already in ``data``) to the results file and return the merged
    data. The file is re-read under a lock and replaced atomically, so two studies of one profile
    running side by side (one thread each, one per core) keep each other's rows."""
    import fcntl
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = load_results(path, profile)
        disk["profile"] = data["profile"]
        disk["commands"] = disk.get("commands", []) + [c for c in data.get("commands", [])
                                                       if c not in disk.get("commands", [])]
        if "fp" in data:
            disk.setdefault("fp", data["fp"])
        if row is not None and run_key(row) not in {run_key(r) for r in disk["runs"]}:
            disk["runs"].append(row)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(disk, indent=1))
        os.replace(tmp, path)
    return disk


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), required=True)
    ap.add_argument("--study", choices=sorted(STUDIES))
    ap.add_argument("--report", action="store_true",
                    help="only print the tables and write the plot (with --study: first its matrix, measured or not)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--bits", default=None, help="override the study's bit widths, e.g. 2,3,4g128")
    ap.add_argument("--variants", default=None, help="override the study's variants")
    ap.add_argument("--nsamples", default=None, help="override the calibration window counts (default: the profile's)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per job (default: 2 // --jobs; --jobs 1 --threads 1 leaves a core free)")
    ap.add_argument("--errors", type=int, default=0,
                    help="also the per-block/per-layer output errors on this many windows of every evaluation text")
    ap.add_argument("--keep", action="store_true", help="keep the quantized checkpoints in --work")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("LOWMEM_BOA_SHARED", REPO.parent / "shared")))
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work" / "quality")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="--report: write the plot here")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    texts = list(profile["evals"])
    out = args.out or REPO / "benchmarks" / "results" / f"quality_{args.profile}.json"
    data = load_results(out, profile)
    if args.report:
        summary = summarize(data["runs"], texts)
        if args.study:      # the study's matrix (--bits / --variants narrow it), then the full tables
            st = STUDIES[args.study]
            variants = args.variants.split(",") if args.variants else st["variants"]
            bits = args.bits.split(",") if args.bits else st["bits"]
            na = llmc_na(profile, args.shared, variants, bits)
            print(f"{args.study} study ({' / '.join(texts)}):\n"
                  + matrix(summary, data.get("fp") or {}, texts, variants, bits,
                           int(args.nsamples) if args.nsamples else profile["nsamples"],
                           {("llmc-gptq", b) for b in na}) + "\n")
            for b, why in na.items():
                print(f"n/a: llmc-gptq {b}: {why}")
        print(markdown(summary, data["fp"], texts))
        for t in texts:
            if any(t in r.get("errors", {}) for r in data["runs"]):
                print("\n" + errors_table(data["runs"], t))
                if any("block_rel_error" in (r.get("errors", {}).get(t) or [{}])[0] for r in data["runs"]):
                    print("\n" + errors_table(data["runs"], t, "block_rel_error"))
                    for b in sorted({r["bits"] for r in data["runs"] if t in r.get("errors", {})}):
                        vs = sorted({r["variant"] for r in data["runs"] if r["bits"] == b and t in r.get("errors", {})},
                                    key=lambda v: (v != "gptq", v))
                        print(f"\nbits {b}:\n" + layer_errors_table(data["runs"], t, vs, b))
        if any(r.get("phase_seconds") for r in data["runs"]):
            print("\nquantization seconds per phase (sum over blocks; mean over seeds):\n" + phases_table(data["runs"]))
        if args.plot:
            plot(summary, data["fp"], texts, args.profile, args.plot)
        return
    if not args.study:
        ap.error("--study or --report")
    st = STUDIES[args.study]
    bits = args.bits.split(",") if args.bits else st["bits"]
    variants = args.variants.split(",") if args.variants else st["variants"]
    nsamples = [int(n) for n in args.nsamples.split(",")] if args.nsamples else \
        [profile["nsamples"] if n is None else n for n in st["nsamples"]]
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    data.setdefault("commands", []).append("python benchmarks/quality.py "
                                           + " ".join(argv if argv is not None else sys.argv[1:]))
    data["profile"] = {k: (str(v()) if callable(v) else v) for k, v in profile.items()} | {"name": args.profile}
    done = {run_key(r) for r in data["runs"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    base = {"profile": args.profile, "shared": str(args.shared), "work": str(args.work),
            "threads": args.threads or max(1, 2 // args.jobs), "errors": args.errors, "keep": args.keep}
    jobs = [] if "fp" in data else [base | {"variant": "fp"}]   # the baseline runs beside the first job
    # cells a tool cannot do on this model are left out with a note before any work starts (an error when
    # nothing else is asked for)
    na = llmc_na(profile, args.shared, variants, bits)
    for b, why in na.items():
        print(f"skipping llmc-gptq {b}: {why}", flush=True)
    cells = [(v, b) for b in bits for v in variants if not (v == "llmc-gptq" and b in na)]
    if not cells:
        ap.error("nothing to run: " + "; ".join(f"llmc-gptq {b}: {why}" for b, why in na.items()))
    jobs += [base | {"variant": v, "bits": b, "seed": s, "nsamples": n}
             for b in bits for n in nsamples for v in variants for s in seeds
             if (v, b) in cells and (v, b, s, n) not in done]
    if any(j["variant"] == "llmc-gptq" for j in jobs):
        ensure_llmc_venv()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # spawn, not fork: a forked child of a process that already ran torch's thread pool can hang
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = [ex.submit(run_one, j) for j in jobs]
        for fut in as_completed(futures):   # each row is saved as soon as its run ends
            row = fut.result()
            if row["variant"] == "fp":
                data["fp"] = row["ppl"]
                data = save_result(out, profile, data, None)
                print("fp: " + " ".join(f"{t} {v:.4f}" for t, v in data["fp"].items()), flush=True)
            else:
                data = save_result(out, profile, data, row)
                print(f"{row['variant']:>16} W{row['bits']} n{row['nsamples']} seed {row['seed']}: "
                      + " ".join(f"{t} {p:.3f}" for t, p in row["ppl"].items())
                      + f" ({row['quant_seconds']:.0f} s + eval {row['eval_seconds']:.0f} s)", flush=True)
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s")
    print(markdown(summarize(data["runs"], texts), data["fp"], texts))


if __name__ == "__main__":
    main()
