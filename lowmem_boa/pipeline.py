"""End-to-end streaming quantization of a Hugging Face causal LM (the library behind run_quant.py).

``prepare_run`` does every check and the memory plan without touching weights (bad input and
too-small budgets fail here, before any work). ``quantize_model`` then runs:

1. calibration windows -> first-block inputs (embedding stage on the device, one chunk at a time,
   captured in front of block 0);
2. for every block: quantize it true-sequentially (``block.BlockQuantizer``), save it atomically
   with its codes, propagate the calibration data through the quantized block;
3. a resumed run first replays the finished blocks (from their saved files) to rebuild the
   inputs of the first unfinished one, so the result is bit-identical to an uninterrupted run;
4. export the fake-quantized model as a Hugging Face checkpoint plus ``quant_report.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from . import __version__
from .block import BlockQuantizer
from .checkpoint import RunState, atomic_write_bytes, export_fake_quant
from .config import ACT_ORDER_MAX_BITS, BLOCK_V_MIN_BITS, DEFAULT_NSAMPLES, FP_TARGETS_DEFAULT, MLP_ROW_MAX_BITS, QuantConfig, RunOptions
from .data import calibration_windows, file_source, load_source, local_files
from .forward import first_block_inputs
from .models import get_adapter
from .scheduler import (ActivationStore, CheckpointReader, Ledger, PlanInputs, Scheduler, build_skeleton,
                        fmt_bytes, load_config, make_plan, parse_size, resolve_model_dir)
from .scheduler.planner import CPU_CHUNK_TOKENS, PHASE_PROPAGATE, Plan, PlanError
from .solvers.kquant import KTYPES, base_type
from .stats import mlp_row_group
from .ui import Console


@dataclass
class PreparedRun:
    qc: QuantConfig
    ro: RunOptions
    config: object
    adapter: object
    model_dir: Path | None
    device: torch.device
    dtype: torch.dtype
    plan: Plan
    state_mode: str | None = None
    notes: list = field(default_factory=list)
    source: object = None          # calibration text (read before any work)
    embedding_type: str | None = None   # GGUF type of the token embedding / output head (--kquant runs)


def resolve_device(name: str, require_available: bool = True) -> torch.device:
    """``auto`` -> cuda if present else cpu. A plan may target a device this machine lacks."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if require_available and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def resolve_dtype(choice: str, config, device: torch.device, notes: list) -> torch.dtype:
    if choice != "auto":
        return getattr(torch, choice)
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dt = getattr(torch, dt) if isinstance(dt, str) else dt
    if device.type == "cpu" and dt in (torch.float16, torch.bfloat16):
        notes.append(f"checkpoint dtype {dt} computed in float32 on the CPU")
        return torch.float32
    if device.type == "cuda" and dt == torch.bfloat16 and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        notes.append("bfloat16 is not supported by this GPU: using float16")
        return torch.float16
    return dt


def default_budgets(device: torch.device, ro: RunOptions) -> tuple[int, int]:
    host_avail = psutil.virtual_memory().available
    cpu_budget = parse_size(ro.max_cpu_mem) if ro.max_cpu_mem else int(host_avail * 0.8)
    if ro.max_gpu_mem:
        budget = parse_size(ro.max_gpu_mem)
        if device.type == "cuda" and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(device).total_memory
            if budget > total:
                raise ValueError(f"--max-gpu-mem {ro.max_gpu_mem} exceeds the device's {fmt_bytes(total)}")
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("planning for a GPU this machine lacks needs --max-gpu-mem")
        budget = int(torch.cuda.get_device_properties(device).total_memory * 0.9)
    else:
        budget = cpu_budget
    return budget, cpu_budget


def resolve_defaults(qc: QuantConfig) -> list[str]:
    """Every option left at None takes its default from the rest of the configuration (QuantConfig's
    ``default_*`` rules); returns one note per default that acts on this method, naming the flags."""
    boa, solves = qc.method == "boa", qc.method != "rtn"
    rules = [   # (option, its default, whether a note is due, the note)
        ("mlp_row_hessian", qc.default_mlp_row_hessian, boa,
         lambda on: f"BoA: MLP-input layers {'with' if on else 'without'} their row Hessian at {qc.wbits} bits "
                    f"(default: with up to {MLP_ROW_MAX_BITS} bits; --mlp-row-hessian / --no-mlp-row-hessian to choose)"),
        ("block_v", qc.default_block_v, boa,
         lambda on: f"BoA: V {'with' if on else 'without'} its per-head attention-weighted column Hessian (block_v) "
                    f"at {qc.wbits} bits (default: from {BLOCK_V_MIN_BITS} bits; --block-v / --no-block-v to choose)"),
        ("act_order_col", qc.default_act_order_col, solves and not qc.search_orders,
         lambda on: f"columns swept {'by decreasing diag(H_col) (act-order)' if on else 'in order'} (default: "
                    f"act-order up to {ACT_ORDER_MAX_BITS.get(qc.method)} bits; --act-order-col / --no-act-order-col)"),
        ("act_order_row", qc.default_act_order_row, boa and not qc.search_orders,
         lambda on: f"BoA: rows of a head swept {'by decreasing diag(H_row) (act-order)' if on else 'in order'} "
                    "(default: as the columns; --act-order-row / --no-act-order-row)"),
        ("fp_targets", lambda: FP_TARGETS_DEFAULT and solves and not qc.true_sequential, solves,
         lambda on: f"fitting towards the full-precision model's outputs (--fp-targets, alpha {qc.fp_alpha}): "
                    + ("on, a second activation stream (--no-fp-targets: off)" if on else "off with --true-sequential")),
    ]
    notes = []
    for name, default, noted, note in rules:
        if getattr(qc, name) is None:
            setattr(qc, name, bool(default()))
            if noted:
                notes.append(note(getattr(qc, name)))
    return notes


def prepare_run(qc: QuantConfig, ro: RunOptions, console: Console | None = None) -> PreparedRun:
    """All checks and the plan; reads configs and file names only (no weights, no data)."""
    console = console or Console(ro.progress)
    qc.validate()
    notes: list = []
    plan_only = ro.plan_only
    config = load_config(qc.model)
    adapter = get_adapter(config)
    model_dir = None
    if not plan_only or Path(qc.model).is_dir():
        model_dir = resolve_model_dir(qc.model, need_weights=not plan_only) if not qc.model.endswith(".json") else None
    if not plan_only:
        if model_dir is None:
            raise ValueError("--model must be a model directory or hub id (a config JSON only works with --plan-only)")
        CheckpointReader(model_dir)   # weights present and readable, before any work
    if qc.seqlen > adapter.max_positions:
        notes.append(f"--seqlen {qc.seqlen} capped to the model's {adapter.max_positions} positions")
        qc.seqlen = adapter.max_positions
    notes += resolve_defaults(qc)
    if qc.nsamples is None:
        qc.nsamples = DEFAULT_NSAMPLES
        if qc.uses_calibration:
            notes.append(f"calibration: {qc.nsamples} windows of {qc.seqlen} tokens ({qc.nsamples * qc.seqlen:,} tokens"
                         + (f"; the paper used 128 x 2048, and more windows of {qc.seqlen} did not help in "
                            "docs/results.md" if qc.seqlen < 2048 else "") + "; --nsamples N to change)")
    source = None
    if qc.uses_calibration and not plan_only:
        if qc.calib_file:
            if not Path(qc.calib_file).is_file():
                raise ValueError(f"--calib-file {qc.calib_file} does not exist")
        elif ro.data_dir is not None:
            local_files(qc.calib, "train", ro.data_dir)
    from .export.formats import EXPORT_CHOICES
    bad = [f for f in ro.export if f not in EXPORT_CHOICES]
    if bad:
        raise ValueError(f"--export: unknown format(s) {', '.join(bad)}; choose from {', '.join(EXPORT_CHOICES)}")
    emb = None
    if qc.kquant:
        from .solvers.kquant import FILE_TYPES, layer_type, llama_file_type_overrides, override_layer
        shapes = adapter.linear_shapes()
        n_blocks = adapter.n_blocks

        def layer_of(key):
            return override_layer(key, n_blocks)
        unknown = sorted({layer_of(k) for k in (qc.kquant_types or {})} - set(shapes))
        if unknown:
            raise ValueError(f"--kquant-type: no layer {', '.join(unknown)} in this model's blocks "
                             f"(its layers: {', '.join(shapes)}; BLOCK.LAYER for one block, BLOCK < {n_blocks})")
        if qc.kquant in FILE_TYPES:   # llama.cpp's per-block types, under the user's own --kquant-type
            mine = {layer_of(k) for k in (qc.kquant_types or {})}
            rules = llama_file_type_overrides(qc.kquant, [n for n in shapes if n not in mine], n_blocks,
                                              adapter.heads.n_heads // adapter.heads.n_kv_heads)
            qc.kquant_types = {**rules, **(qc.kquant_types or {})} or None
            promoted = sorted({(layer_of(k), t) for k, t in rules.items()})
            notes.append(f"--kquant {qc.kquant}: llama.cpp's file type, base {base_type(qc.kquant)}; more bits in "
                         + (", ".join(f"{n} {t} ({sum(layer_of(k) == n and v == t for k, v in rules.items())} "
                                      f"blocks)" for n, t in promoted) or "no layer"))
        narrow = sorted({n for n, (_, cols) in shapes.items() for i in range(n_blocks)
                         if layer_type(qc.kquant, cols, n, qc.kquant_types, i) is None})
        if narrow:
            raise ValueError(f"--kquant {qc.kquant}: {', '.join(narrow)} of this model have inputs that are not a "
                             "multiple of 32, which no GGUF block type stores")
        types = {n: layer_type(qc.kquant, cols, n, qc.kquant_types) for n, (_, cols) in shapes.items()}
        fallback = {n: t for n, t in types.items() if t != (qc.kquant_types or {}).get(n, base_type(qc.kquant))}
        if fallback:
            notes.append(f"--kquant {qc.kquant}: layers whose inputs are not a multiple of 256 use "
                         f"{', '.join(sorted(set(fallback.values())))} (32-column blocks, as llama.cpp falls back): "
                         + ", ".join(f"{n.rsplit('.', 1)[-1]} {t}" for n, t in fallback.items()))
        if any(f != "gguf" for f in ro.export):
            raise ValueError("--kquant runs export only to gguf (their grids are llama.cpp's, not GPTQ's)")
        from .solvers.kquant import embedding_type
        emb = embedding_type(qc.kquant_embedding, adapter.heads.hidden_size)
        notes.append(f"--kquant {qc.kquant}: token embedding" + ("" if config.tie_word_embeddings else " and output head")
                     + (f" rounded to {emb} (no Hessian" + ("; llama.cpp's choice, --kquant-embedding to change)"
                                                           if qc.kquant_embedding is None else ")")
                        if emb else " kept in the source precision"))
    if "gguf" in ro.export:
        from .export.gguf_file import check_gguf_exportable, check_gguf_tokenizer
        if not qc.kquant:
            raise ValueError("--export gguf writes weights solved on llama.cpp's grids: add --kquant TYPE "
                             "(q2_k, q3_k, q4_k, q5_k, q6_k)")
        check_gguf_exportable(config.to_dict())
        if model_dir is not None:
            check_gguf_tokenizer(model_dir)
    if not ro.fake_quant and not ro.export:
        ro.export = ["packed"]
        notes.append("--no-fake-quant: writing the packed checkpoint (OUTPUT/packed) as the final form")
    if ro.hessians not in ("auto", "cpu", "device"):
        raise ValueError(f"--hessians must be auto, cpu or device, got {ro.hessians!r}")
    device = resolve_device(ro.device, require_available=not plan_only)
    dtype = resolve_dtype(qc.dtype, config, device, notes)
    budget, cpu_budget = default_budgets(device, ro)
    inputs = PlanInputs(method=qc.method, calibration=qc.uses_calibration, nsamples=qc.nsamples,
                        seqlen=qc.seqlen, dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                        block_v=qc.block_v, device_type=device.type,
                        group_size=qc.group_size or (KTYPES[base_type(qc.kquant)].sub if qc.kquant else None),
                        true_sequential=qc.true_sequential, search_orders=qc.search_orders,
                        fp_targets=qc.fp_targets, fp_bound=bool(qc.fp_targets and qc.fp_max_shift),
                        block_v_targets=bool(qc.block_v_targets and qc.fp_targets and qc.block_v and qc.method == "boa"),
                        mlp_row_group=(mlp_row_group(adapter.intermediate_size, qc.mlp_row_group)
                                       if qc.method == "boa" and qc.mlp_row_hessian else None),
                        qparam=qc.qparam, grid_coarse=qc.grid_coarse, refine_scales=qc.refine_scales,
                        max_chunk_tokens=CPU_CHUNK_TOKENS if device.type == "cpu" and not ro.max_gpu_mem else None,
                        wbits=qc.wbits, fake_quant=ro.fake_quant, exports=tuple(ro.export))
    plan = make_plan(adapter, inputs, budget, cpu_budget, ro.hessians)
    state_mode = None
    if not plan_only:
        if not ro.output:
            raise ValueError("--output is required (where the quantized model is written)")
        state_mode = RunState.check_output(Path(ro.output), _state_config(qc, model_dir), ro.overwrite,
                                           ro.state_dir)
        state = RunState(Path(ro.output), ro.state_dir)
        check_disk(plan, Path(ro.output), state.dir, state_mode)
        finished = state_mode == "resume" and json.loads(state.path.read_text()).get("complete")
        if qc.uses_calibration and not finished:   # read (or downloaded) now: a missing corpus fails before any work
            source = file_source(qc.calib_file) if qc.calib_file else load_source(qc.calib, "train", ro.data_dir)
    return PreparedRun(qc=qc, ro=ro, config=config, adapter=adapter, model_dir=model_dir, device=device,
                       dtype=dtype, plan=plan, state_mode=state_mode, notes=notes, source=source,
                       embedding_type=emb)


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _inside(path: Path, parent: Path) -> bool:
    return path.resolve().is_relative_to(parent.resolve())


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def check_disk(plan: Plan, output: Path, state_dir: Path, mode: str) -> None:
    """Refuse before any work when the disk(s) of ``output`` and the state directory cannot hold
    the plan's disk peak (what a resumed run already wrote counts as present)."""
    from .scheduler.planner import DISK_ACTS, DISK_STATE
    terms = plan.disk_terms
    # a resumed run's state and outputs are rewritten in place (a finished run rerun with --export)
    present = (_bytes_under(output) + (0 if _inside(state_dir, output) else _bytes_under(state_dir))
               if mode == "resume" else 0)
    at_state = terms[DISK_STATE] + terms[DISK_ACTS]
    at_output = sum(v for k, v in terms.items() if k not in (DISK_STATE, DISK_ACTS))   # the outputs
    dev_out, dev_state = _existing(output), _existing(state_dir)
    same = dev_out.stat().st_dev == dev_state.stat().st_dev
    needs = [(dev_out, plan.disk_peak - present)] if same else \
        [(dev_state, at_state - present), (dev_out, at_output)]
    for where, need in needs:
        free = shutil.disk_usage(where).free
        if need > free:
            hints = []
            if plan.inputs.fake_quant:
                hints.append(f"--no-fake-quant (saves {fmt_bytes(terms['fake-quantized checkpoint'])}; writes the "
                             "packed checkpoint instead)")
            if terms[DISK_ACTS]:
                hints.append(f"a larger --max-cpu-mem keeps the activations ({fmt_bytes(terms[DISK_ACTS])}) in RAM")
            hints.append("--state-dir on another disk")
            raise PlanError(f"not enough disk space at {where}: the run needs {fmt_bytes(need)} there at its peak "
                            f"({', '.join(f'{k} {fmt_bytes(v)}' for k, v in terms.items() if v)}), "
                            f"{fmt_bytes(free)} are free. Options: {'; '.join(hints)}")


def _state_config(qc: QuantConfig, model_dir: Path | None) -> dict:
    """What keys a run for resume: the quantization config and the model's identity."""
    d = qc.state_dict()
    d["model"] = str(Path(model_dir).resolve()) if model_dir else qc.model
    if model_dir is not None:
        d["model_files"] = CheckpointReader(model_dir).fingerprint()
    if qc.calib_file:
        p = Path(qc.calib_file)
        d["calib_file"] = [str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)]
    d["lowmem_boa"] = __version__
    return d


def quantize_model(qc: QuantConfig, ro: RunOptions, console: Console | None = None) -> dict:
    """Run (or resume) a quantization job; returns the report written to quant_report.json."""
    console = console or Console(ro.progress)
    prep = prepare_run(qc, ro, console)
    for note in prep.notes:
        console.note(note)
    console.plan(prep)
    if ro.plan_only:
        return {"plan": prep.plan.as_dict()}
    return _run(prep, console)


# execution settings that can change a result's last bits (device, precision, summation order); the device
# budget is recorded too but matters only through the chunking it gives
_SUMMATION_KEYS = ("device", "dtype", "chunk", "attn_chunk", "attn_heads", "hessians_on_device")


def _run(prep: PreparedRun, console: Console) -> dict:
    qc, ro, adapter, plan = prep.qc, prep.ro, prep.adapter, prep.plan
    t_start = time.perf_counter()
    output = Path(ro.output)
    state = RunState(output, ro.state_dir)
    execution = {"device": str(prep.device), "dtype": str(prep.dtype), "chunk": plan.chunk,
                 "attn_chunk": plan.attn_chunk, "attn_heads": plan.attn_heads,
                 "hessians_on_device": plan.hessians_on_device, "budget": plan.budget}
    state.open(_state_config(qc, prep.model_dir), prep.state_mode, execution)
    if prep.state_mode == "resume":
        first = state.data.get("execution") or {}
        changed = [k for k in _SUMMATION_KEYS if first.get(k) != execution[k]]
        if changed:     # the budget alone changes nothing: only the plan it gives can change summation order
            console.note("resuming with execution settings that differ from the first run ("
                         + ", ".join(f"{k} {first.get(k)} -> {execution[k]}" for k in changed)
                         + "): the result is valid but may differ in the last bits from an uninterrupted run")
    n_blocks = adapter.n_blocks
    done = state.verified_prefix(n_blocks)
    if prep.state_mode == "resume":
        console.note(f"resuming: {done}/{n_blocks} blocks already quantized")

    if prep.device.type == "cuda":
        total = torch.cuda.get_device_properties(prep.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, plan.budget / total), prep.device)
    ledger = Ledger(prep.device, plan.budget)
    reader = CheckpointReader(prep.model_dir)
    model = build_skeleton(prep.config, prep.dtype)
    sch = Scheduler(model, reader, prep.device, ledger, prep.dtype, plan.hessians_on_device)

    store, kwargs = None, None
    with torch.inference_mode():
        if qc.uses_calibration and done < n_blocks:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(prep.model_dir)
            source = prep.source or (file_source(qc.calib_file) if qc.calib_file     # a "finished" run whose
                                     else load_source(qc.calib, "train", ro.data_dir))  # block files failed checks
            ids = calibration_windows(tokenizer, source, qc.nsamples, qc.seqlen, qc.seed, console.note)
            store = ActivationStore(qc.nsamples, qc.seqlen, adapter.heads.hidden_size, prep.dtype,
                                    work_dir=state.dir / "work", on_disk=plan.activations_on_disk,
                                    fp_stream=qc.fp_targets)
            kwargs = first_block_inputs(sch, model, adapter, ids, store, plan.chunk, plan)
            kwargs_bytes = sum(t.numel() * t.element_size() for v in kwargs.values()
                               for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor))
            ledger.reserve("block kwargs (RoPE tables, masks)", kwargs_bytes)

        with console.blocks(n_blocks, done) as progress:
            for i in range(n_blocks):
                name = adapter.block_name(i)
                if i < done:
                    if store is not None and i < n_blocks - 1:
                        progress.update(i, "replaying finished block")
                        weights, _ = state.load_block(i)
                        if store.fp_stream:   # the fp model's stream: the original block
                            with sch.resident([name], f"block {i} (full precision)") as (blk,):
                                BlockQuantizer(sch, adapter, plan, qc, kwargs).propagate(blk, store, fp=True)
                        with sch.resident([name], f"block {i}", weights={f"{name}.{k}": v for k, v in weights.items()}) as (blk,):
                            BlockQuantizer(sch, adapter, plan, qc, kwargs).propagate(blk, store)
                        store.advance()
                    continue
                progress.update(i, "quantizing")
                with sch.resident([name], f"block {i}") as (blk,):
                    bq = BlockQuantizer(sch, adapter, plan, qc, kwargs, index=i)
                    outcome = bq.quantize(blk, store)
                    layer_stats = [vars(r) for r in outcome.layers]
                    stats = {"seconds": outcome.seconds, "phase_seconds": outcome.phase_seconds,
                             "layers": layer_stats}
                    meta = {"method": qc.method, "wbits": qc.wbits, "sym": qc.sym, "group_size": qc.group_size,
                            "qparam": qc.qparam, "layers": list(outcome.quant),
                            **({"kquant": qc.kquant} if qc.kquant else {})}
                    state.save_block(i, outcome.weights, outcome.quant, meta, stats)
                    del outcome    # the block's host copy and codes: not kept through the next block
                    if store is not None and i < n_blocks - 1:
                        progress.update(i, "propagating")
                        stats["phase_seconds"][PHASE_PROPAGATE] = bq.propagate(blk, store)
                        state.update_block_stats(i, stats)
                        store.advance()
                progress.advance(i, stats, ledger)
        if store is not None:
            store.close()

    if ro.fake_quant:
        console.note("writing the Hugging Face checkpoint")
        files = export_fake_quant(output, prep.model_dir, prep.config,
                                  _export_tensors(model, reader, state, adapter, prep.dtype, prep.embedding_type),
                                  prep.dtype)
    else:
        files = export_fake_quant(output, prep.model_dir, prep.config, iter(()), prep.dtype, config_only=True)
    report = {
        "lowmem_boa": __version__, "config": qc.as_dict(), "options": ro.as_dict(), "notes": prep.notes,
        "execution": execution, "plan": plan.as_dict(), "memory": ledger.report(),
        "blocks": state.block_stats(), "seconds_total_this_run": time.perf_counter() - t_start,
        "resumed_from_block": done if prep.state_mode == "resume" else None, "files": files,
        "state_dir": str(state.dir.resolve()), "source_model_dir": str(Path(prep.model_dir).resolve()),
    }
    state.mark_complete({"exported_files": files + ["quant_report.json"]})
    atomic_write_bytes(output / "quant_report.json", json.dumps(report, indent=1, default=str).encode())
    if ro.export:
        from .export.formats import export_choice
        for choice in ro.export:
            console.note(f"exporting {choice} to {output / choice}")
            if choice == "gptq" and not qc.sym:
                console.note("gptq (v1) with asymmetric grids: GPTQModel refuses such checkpoints unless it wrote "
                             "them itself; export gptq_v2 for GPTQModel (docs/results.md, Interoperability)")
            export_choice(output, choice)
        report["exports"] = list(ro.export)
        state.mark_complete({"exported_files": files + ["quant_report.json"] + list(ro.export)})
    console.summary(report)
    return report


def _export_tensors(model, reader: CheckpointReader, state: RunState, adapter, dtype, embedding_type=None):
    """``(name, tensor)`` for the exported checkpoint in state-dict order, one block at a time; with
    ``embedding_type`` (a GGUF type, ``--kquant``) the token embedding and output head as that type
    dequantizes them (``solvers.kquant.quantize_tensor`` of the source weight, as the GGUF writer stores it)."""
    names = list(model.state_dict().keys())
    prefix = adapter.blocks_prefix + "."
    tied = getattr(model.config, "tie_word_embeddings", False)
    out_emb = model.get_output_embeddings()
    params = list(model.named_parameters(remove_duplicate=False))
    head_name = next((n for n, p in params if p is out_emb.weight), None)
    emb_names = {n for n, p in params if p is model.get_input_embeddings().weight or p is out_emb.weight}
    current, cache = None, {}
    for n in names:
        if tied and n == head_name:
            continue
        if n.startswith(prefix):
            i = int(n[len(prefix):].split(".", 1)[0])
            if i != current:
                cache, _ = state.load_block(i)
                current = i
            yield n, cache[n[len(prefix) + len(str(i)) + 1:]]
        else:
            key = reader.resolve(n, getattr(model, "base_model_prefix", "model"))
            if key is None:
                continue  # non-persistent or derived (e.g. rotary frequencies)
            t = reader.get(key)
            if embedding_type and n in emb_names:
                from .solvers.kquant import quantize_tensor
                t = quantize_tensor(t, embedding_type)[2]
            yield n, t.to(dtype) if t.is_floating_point() else t
