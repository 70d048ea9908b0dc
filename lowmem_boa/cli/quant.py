"""``run_quant.py``: quantize a Hugging Face causal LM with BoA, GPTQ or RTN under a memory budget.

    python run_quant.py --model meta-llama/Llama-2-7b-hf --wbits 2 --method boa \\
        --config configs/p100-16gb.yaml --output out/llama2-7b-boa-w2

Rerunning the same command after an interruption resumes from the last finished block.
Exit codes: 0 done, 2 bad input or budget (nothing was done), 1 failure during the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import BOA_GRID_COARSE, CALIB_SETS, DTYPES, JOINT_ROWS_DEFAULT, METHODS, WBITS, QuantConfig, RunOptions
from ..solvers.validation import GRIDS

PRESET_KEYS = {"device", "max_gpu_mem", "max_cpu_mem", "hessians", "nsamples", "seqlen", "block_v", "dtype",
               "true_sequential", "v_row_hessian", "fp_targets", "fp_alpha", "fp_max_shift", "block_v_targets",
               "follow_grids", "refine_scales", "joint_rows", "grid_coarse", "mlp_row_hessian", "mlp_row_group", "mlp_row_damp",
               "residual_weights", "act_order_col", "act_order_row", "search_orders", "data_dir", "calib", "qparam", "group_size", "percdamp", "block_size"}


def _joint_rows(text: str) -> int | None:
    """``--joint-rows``: a positive integer, or ``auto`` (the default: None, resolved per layer)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text!r}") from None


def _kquant_pair(text: str) -> tuple[str, str]:
    """``--kquant-type LAYER=TYPE`` (e.g. ``mlp.down_proj=q3_k``)."""
    layer, sep, kind = text.partition("=")
    if not sep or not layer or not kind:
        raise argparse.ArgumentTypeError(f"must be LAYER=TYPE (e.g. mlp.down_proj=q3_k), got {text!r}")
    return layer.strip(), kind.strip().lower()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_quant.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="preset YAML (configs/*.yaml); flags given here override it")
    m = p.add_argument_group("model and method")
    m.add_argument("--model", required=True, help="local model directory or hub id (a config .json with --plan-only)")
    m.add_argument("--method", choices=METHODS, default="boa")
    m.add_argument("--wbits", type=int, choices=WBITS, default=2)
    m.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    m.add_argument("--group-size", type=int, default=None, help="columns per grid (default: one grid per row)")
    m.add_argument("--qparam", choices=GRIDS, default="hessian", help="grid search (default hessian)")
    m.add_argument("--block-v", dest="block_v", action=argparse.BooleanOptionalAction, default=None,
                   help="BoA: per-head X A^T A X^T column Hessian for V (the paper's Table 1; default: off at 2 bits, "
                   "where it lost to the shared X X^T on SmolLM2, on from 3 bits, where it won; docs/results.md; "
                   "on costs the block's largest statistics phase)")
    m.add_argument("--act-order-col", dest="act_order_col", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize columns by decreasing diag(H_col) (GPTQ's desc_act; the exported weights keep the "
                   "original column order; with --group-size the groups are static). Default: on for BoA and GPTQ at 2-4 "
                   "bits, per channel and with groups (SmolLM2, BoA 2-bit at the paper's protocol: -24 %% "
                   "WikiText-2 and -42 %% C4 perplexity; BoA 3-bit, GPTQ 2-bit and 3-bit at the reference recipe: "
                   "-6 %% / -10 %%, -24 %% / -29 %% and -8 %% / -8 %%; 4-bit: BoA -2.1 %% / -2.2 %%, GPTQ -4.7 %% / -7.4 %%; "
                   "in groups of 128: 3 bits BoA -1.6 %% / -3.9 %%, GPTQ -4.8 %% / -7.4 %%, 4 bits BoA -0.8 %% / -0.1 %%, "
                   "GPTQ -2.6 %% / -2.7 %%; at the same time, docs/results.md), off otherwise")
    m.add_argument("--act-order-row", dest="act_order_row", action=argparse.BooleanOptionalAction, default=None,
                   help="BoA: quantize the rows of a head (or MLP row group) by decreasing diag(H_row). Default: "
                   "as --act-order-col's")
    m.add_argument("--search-orders", action="store_true",
                   help="per layer, try every act-order combination (BoA: col/row, GPTQ: col) and keep the one "
                   "with the lowest calibration objective (2-4x the solver time); overrides --act-order-*")
    m.add_argument("--true-sequential", dest="true_sequential", action=argparse.BooleanOptionalAction,
                   default=False, help="GPTQ/BoA: statistics of each layer group from the block with the groups "
                   "before it already quantized; default off: every Hessian of a block from one pass over the "
                   "full-precision block (as the official BoA code; better on stories260K, docs/results.md)")
    m.add_argument("--v-row-hessian", dest="v_row_hessian", action=argparse.BooleanOptionalAction, default=True,
                   help="BoA: row Hessian W_out,h^T W_out,h for V (default on); off: V per head with GPTQ")
    m.add_argument("--mlp-row-hessian", dest="mlp_row_hessian", action=argparse.BooleanOptionalAction, default=None,
                   help="BoA: also solve the MLP-input layers (fc1 / gate, up) with a row Hessian "
                   "(W_out^T W_out weighted by the activation's gains), as BoA solves V through W_out (default: on "
                   "at 2-3 bits, off at 4+: chosen on stories260K, kept at 2 bits by SmolLM2's A/B on both texts, "
                   "docs/results.md); off: the paper's BoA")
    m.add_argument("--mlp-row-group", type=int, default=512,
                   help="--mlp-row-hessian: rows per block of the row Hessian (the largest divisor of the MLP "
                   "size up to this; each block costs one sweep, like a head of this size; default 512, 128 "
                   "until SmolLM2 measured 512 better on both texts: pass 128 to resume a run started before)")
    m.add_argument("--mlp-row-damp", type=float, default=0.0,
                   help="--mlp-row-hessian: add this fraction of each row group's mean diagonal to its row Hessian "
                   "(0: none beyond --percdamp; large values approach GPTQ's independent rows)")
    m.add_argument("--residual-weights", dest="residual_weights", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="GPTQ/BoA: in the MLP-output layer's statistics weigh each calibration token by 1 / the mean "
                   "square of the block's output there (the next RMSNorm's scale), so that an attention-sink token's "
                   "massive activation does not own the Hessian (experimental, off; docs/results.md)")
    m.add_argument("--fp-targets", dest="fp_targets", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ/BoA: fit each layer on the quantized model's input towards the full-precision model's "
                   "output of that layer (min ||Q X~ - W X||, asymmetric calibration, scaled by --fp-alpha); keeps a "
                   "second activation stream (2x activation memory, ~2x statistics time). Default: on (off with "
                   "--true-sequential); measured in docs/results.md")
    m.add_argument("--fp-max-shift", type=float, default=1.0,
                   help="--fp-targets: a layer whose correction exceeds ||W' - W|| > this * alpha * ||W|| (the "
                   "quantized stream has drifted far from the fp one: a wild target) is also solved on the target "
                   "bounded to that size, and the result with the lower objective is kept (docs/design.md); "
                   "default 1, 0: never")
    m.add_argument("--block-v-targets", dest="block_v_targets", action=argparse.BooleanOptionalAction, default=False,
                   help="BoA with --block-v and --fp-targets: correct V's target per KV head with the attention-weighted "
                   "cross statistics of the two streams (sum X_fp A_fp^T A X~^T, the fp stream's own attention maps), "
                   "consistent with block_v's H, instead of q/k/v's plain ones (~2x the block_v statistics; "
                   "experimental, off)")
    m.add_argument("--fp-alpha", type=float, default=0.25,
                   help="--fp-targets: move each layer's target this fraction of the way from its own output on the "
                   "quantized model's input (0) to the full-precision model's output (1); default 0.25 "
                   "(GPTAQ/TurboBoA's alpha)")
    m.add_argument("--follow-grids", dest="follow_grids", action=argparse.BooleanOptionalAction, default=True,
                   help="BoA: search each row's grid right before the row is quantized, on the row as the earlier "
                   "rows' updates left it (default on; off: all grids up front on the original weights, as the "
                   "paper; grouped grids without --act-order-col always follow)")
    m.add_argument("--refine-scales", type=int, default=1, metavar="SWEEPS",
                   help="GPTQ/BoA: after the codes are fixed, refine every scale by this many sweeps of exact "
                   "coordinate descent on the layer objective (default 1; 0: off; GPTQ's optimum is one sweep)")
    m.add_argument("--joint-rows", type=_joint_rows, default=None, metavar="N",
                   help="BoA: quantize N rows of each head at once and update the rows after them in closed form "
                   f"(head_dim / N sweeps per projection instead of head_dim; default auto: {JOINT_ROWS_DEFAULT}, at "
                   "most a quarter of a head; 1 = the paper's row-by-row BoA)")
    m.add_argument("--grid-coarse", type=int, default=None, metavar="K",
                   help="MMSE/Hessian grid search coarse to fine: every K-th of the 80 shrink factors, then the K-1 "
                   f"either side of each row's best (K=8: 48 instead of 160 candidates; 1 = the full search; "
                   f"default {BOA_GRID_COARSE} for BoA, 1 for GPTQ/RTN)")
    m.add_argument("--kquant", default=None, metavar="TYPE",
                   help="quantize onto llama.cpp's k-quant grid for --export gguf: one type for every layer (q2_k, "
                   "q3_k, q4_k, q5_k, q6_k; inputs not a multiple of 256 fall back to 32-column types as llama.cpp "
                   "does), or llama.cpp's file types with its per-block mixture (q3_k_s, q3_k_m, q3_k_l, q4_k_s, "
                   "q4_k_m, q5_k_s, q5_k_m, and q2_k_m for llama-quantize's Q2_K)")
    m.add_argument("--kquant-type", action="append", default=None, metavar="LAYER=TYPE", type=_kquant_pair,
                   help="with --kquant: this layer of every block (LAYER) or of one block (BLOCK.LAYER, e.g. "
                   "0.mlp.down_proj) in another GGUF type (repeatable; over a file type's own rules), as "
                   "llama-quantize's --tensor-type; e.g. mlp.down_proj=q3_k")
    m.add_argument("--kquant-embedding", default=None, metavar="TYPE",
                   help="with --kquant: GGUF type of the token embedding and output head, rounded without a Hessian "
                   "(default auto: llama.cpp's, Q6_K, or Q8_0 where the hidden size is not a multiple of 256; "
                   "float: the source precision; or any type --kquant-type takes)")
    m.add_argument("--percdamp", type=float, default=0.01)
    m.add_argument("--block-size", type=int, default=128, help="lazy-update block of the OPTQ sweep")
    m.add_argument("--dtype", choices=DTYPES, default="auto", help="compute/export dtype (default: checkpoint's)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", choices=CALIB_SETS, default="wikitext2")
    c.add_argument("--calib-file", help="plain text, or jsonl/json with a 'text' field")
    c.add_argument("--nsamples", type=int, default=None,
                   help="calibration windows (default 128; the run prints the token count it uses)")
    c.add_argument("--seqlen", type=int, default=2048, help="capped to the model's max positions")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--data-dir", help="local corpora (wikitext2/, ptb/, c4/); default: Hugging Face hub")
    r = p.add_argument_group("resources and output")
    r.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda if available)")
    r.add_argument("--max-gpu-mem", help="hard budget of the compute device, e.g. 14GiB")
    r.add_argument("--max-cpu-mem", help="host RAM budget; beyond it activations go to a disk memmap")
    r.add_argument("--hessians", choices=("auto", "cpu", "device"), default="auto",
                   help="where float32 Hessian accumulators live (default: device if it fits)")
    r.add_argument("--output", help="output directory (required unless --plan-only)")
    r.add_argument("--plan-only", action="store_true", help="print the memory plan and exit (no weights needed)")
    r.add_argument("--overwrite", action="store_true",
                   help="start over: replace the run in --output (without it, the same configuration resumes)")
    r.add_argument("--state-dir", help="where the resumable run state lives (default OUTPUT/quant_state): packed "
                   "codes of finished blocks and, when host RAM is short, the activation memmap")
    r.add_argument("--fake-quant", dest="fake_quant", action=argparse.BooleanOptionalAction, default=True,
                   help="write the fake-quantized checkpoint (de-quantized weights in the run dtype, loads in plain "
                   "transformers; default on). --no-fake-quant: only --export formats (packed if none given)")
    r.add_argument("--export", default="", help="also write real low-bit checkpoints: packed, gptq, "
                   "gptq_v2, compressed-tensors (comma-separated) into OUTPUT/<format>/")
    r.add_argument("--eval-ppl", action="store_true", help="WikiText-2 test perplexity of the result")
    r.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return p


def load_preset(path: Path) -> dict:
    import yaml
    if not path.is_file():
        raise ValueError(f"--config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value")
    unknown = sorted(set(data) - PRESET_KEYS - {"description"})
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {', '.join(unknown)} "
                         f"(allowed: {', '.join(sorted(PRESET_KEYS))})")
    data.pop("description", None)
    return data


def parse(argv=None):
    parser = build_parser()
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", type=Path)
    known, _ = first.parse_known_args(argv)
    if known.config is not None:
        try:
            parser.set_defaults(**load_preset(known.config))
        except ValueError as e:
            parser.error(str(e))
    args = parser.parse_args(argv)
    qc = QuantConfig(model=args.model, method=args.method, wbits=args.wbits, sym=args.sym,
                     group_size=args.group_size, qparam=args.qparam, block_v=args.block_v,
                     act_order_col=args.act_order_col, act_order_row=args.act_order_row, percdamp=args.percdamp,
                     search_orders=args.search_orders, true_sequential=args.true_sequential, v_row_hessian=args.v_row_hessian,
                     fp_targets=args.fp_targets, fp_alpha=args.fp_alpha, fp_max_shift=args.fp_max_shift, follow_grids=args.follow_grids,
                     block_v_targets=args.block_v_targets,
                     refine_scales=args.refine_scales, joint_rows=args.joint_rows,
                     grid_coarse=args.grid_coarse, mlp_row_hessian=args.mlp_row_hessian, kquant=args.kquant,
                     kquant_types=dict(args.kquant_type) if args.kquant_type else None,
                     kquant_embedding=args.kquant_embedding,
                     mlp_row_group=args.mlp_row_group, mlp_row_damp=args.mlp_row_damp,
                     residual_weights=args.residual_weights, block_size=args.block_size, calib=args.calib,
                     calib_file=args.calib_file,
                     nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, dtype=args.dtype)
    ro = RunOptions(output=args.output, device=args.device, max_gpu_mem=args.max_gpu_mem,
                    max_cpu_mem=args.max_cpu_mem, data_dir=args.data_dir, overwrite=args.overwrite,
                    plan_only=args.plan_only, hessians=args.hessians, progress=not args.no_progress,
                    eval_ppl=args.eval_ppl, export=[f for f in args.export.split(",") if f],
                    fake_quant=args.fake_quant, state_dir=args.state_dir)
    return qc, ro


def main(argv=None) -> int:
    from ..checkpoint import StateError
    from ..data import DataError
    from ..pipeline import quantize_model
    from ..scheduler import ModelSourceError, PlanError
    from ..ui import Console
    qc, ro = parse(argv)
    console = Console(ro.progress)
    if ro.eval_ppl and not ro.fake_quant and ro.export and "packed" not in ro.export:
        console.error("--eval-ppl with --no-fake-quant evaluates the packed export: add packed to --export")
        return 2
    import torch
    try:
        quantize_model(qc, ro, console)
    except (PlanError, StateError, DataError, ModelSourceError, ValueError) as e:
        console.error(str(e))
        return 2
    except torch.cuda.OutOfMemoryError as e:
        console.error(f"the GPU ran out of memory inside the --max-gpu-mem cap ({e}). The plan is an estimate: "
                      "rerun the same command with a smaller --max-gpu-mem (smaller chunks); finished blocks are "
                      "kept and the run resumes. (Fewer --nsamples, or --no-block-v where --block-v is on, also need less "
                      "memory but change the configuration: they start a new run in another --output or with --overwrite.)")
        return 1
    if ro.eval_ppl and not ro.plan_only:
        from ..eval.run import evaluate_perplexity
        target = ro.output if ro.fake_quant else str(Path(ro.output) / "packed")
        res = evaluate_perplexity(target, ["wikitext2"], qc.seqlen, ro.data_dir, ro.device, ro.max_gpu_mem)
        console.rich.print(f"WikiText-2 perplexity of {target}: {res['wikitext2']['ppl']:.3f}", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
