"""Quantizing one transformer block from its calibration inputs.

Layers are quantized in the adapter's groups:

1. attention statistics (fp q/k/v weights): shared ``H_col = X X^T`` of q/k/v; for BoA the key
   and query Grams per KV head (row Hessians of W_Q / W_K, RoPE-averaged) and, with
   ``block_v`` (default: off at 2 bits), per-KV-head ``X A^T A X^T`` (attention maps computed a few heads and samples at
   a time) and the W_out row Hessian. q, k, v are then quantized (BoA: ``boa``; GPTQ: ``gptq``).
2. out-projection -> ``gptq``; 3. MLP input -> fc1 / gate+up (BoA: with their row Hessians
   through the MLP output by default at <= 3 bits); 4. MLP hidden -> fc2 / down.
Then the quantized block propagates the calibration data to the next block.

By default (one pass) every group's statistics come from the full-precision block on the
quantized model's block input, all of them from one forward per chunk that records the four
groups' inputs (``one_pass_statistics``); ``--true-sequential`` takes each group's from the block
with the groups before it already quantized, a partial forward per group. With fp targets (the
default for GPTQ/BoA) a second stream, the full-precision model's own block inputs, gives each
layer the cross statistics ``C`` of its target (``solvers.target``); in one pass its chunk runs
through the whole fp block once, which also gives the fp stream's next block input. V under
block_v takes q/k/v's ``C``, or with ``--block-v-targets`` its own per-head attention-weighted one (the
fp stream through its own attention maps: ``stats.block_v_cross_grams``). With
``--residual-weights`` the quantized stream's chunk also runs to the block's end, and the MLP-output
layer's sums weigh each token by the inverse mean square of that output (``stats.residual_token_weights``).
The solvers run with the configured corrections (scale refinement, following grids, joint rows: ``solvers``).

Statistics are pure functions (``lowmem_boa.stats``), solvers are pure functions
(``lowmem_boa.solvers``); every tensor that crosses devices goes through the scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .config import QuantConfig, joint_rows_for
from .forward import block_forward, capture_input, capture_inputs
from .models.base import ModelAdapter
from .scheduler.planner import (PHASE_ATTN, PHASE_BLOCK_V, PHASE_MLP_IN, PHASE_MLP_OUT, PHASE_FP_PROPAGATE,
                                PHASE_OUT, PHASE_PROPAGATE, PHASE_SOLVE, PHASE_STATS, Plan, fp_target_workspace,
                                solver_workspace, workspace_bytes)
from .scheduler.scheduler import Scheduler
from .scheduler.store import ActivationStore
from .solvers import boa_quantize, gptq_quantize, rtn_quantize
from .solvers.kquant import layer_type
from .solvers.objective import attention_loss, layer_loss
from .solvers.target import fp_target_weight
from .stats import (attention_grams, block_v_cross_grams, block_v_grams, cross_gram, gain_grams, gram,
                    mlp_row_hessian, qk_row_hessians, residual_token_weights, wout_row_hessian)


@dataclass
class LayerReport:
    name: str
    rows: int
    cols: int
    seconds: float
    rel_error: float | None = None        # tr(dW H dW^T) / tr(W H W^T) with the layer's H_col
    rel_attention_error: float | None = None   # BoA's Kronecker objective, relative
    info: dict = field(default_factory=dict)


@dataclass
class BlockOutcome:
    weights: dict                 # block state dict on the host (quantized linears de-quantized)
    quant: dict                   # layer -> (codes, scale, zero[, k-quant fields]) on the host
    layers: list
    seconds: float
    phase_seconds: dict


class BlockQuantizer:
    def __init__(self, sch: Scheduler, adapter: ModelAdapter, plan: Plan, qc: QuantConfig, kwargs: dict,
                 index: int | None = None):
        self.sch, self.adapter, self.plan, self.qc, self.kwargs = sch, adapter, plan, qc, kwargs
        self.index = index      # the block's number (per-block GGUF types)
        self.heads = adapter.heads
        self.phase_seconds: dict = {}

    # ----- helpers ----------------------------------------------------------------------
    def _phase(self, name: str):
        return self.sch.ledger.phase(name, planned=self.plan.phase(name).total if self._planned(name) else None)

    def _planned(self, name: str) -> bool:
        return any(p.name == name for p in self.plan.phases)

    def _workspace(self, name: str):
        return self.sch.workspace(f"workspace: {name}", workspace_bytes(self.plan.phase(name)))

    def _pairs(self, store: ActivationStore, chunk: int, fp: bool | None = None):
        """``(i0, i1, x, x_fp)`` chunks: the quantized model's block inputs and, with ``fp`` (default:
        ``--fp-targets``), the full-precision model's (``None`` otherwise)."""
        if not (self.qc.fp_targets if fp is None else fp):
            for i0, i1, x in self.sch.chunks(store.inputs, chunk):
                yield i0, i1, x, None
            return
        for (i0, i1, x), (_, _, xf) in zip(self.sch.chunks(store.inputs, chunk),
                                           self.sch.chunks(store.fp_inputs, chunk, "fp activation chunk")):
            yield i0, i1, x, xf

    # ----- accumulating statistics chunk by chunk ------------------------------------------
    # One set of helpers per kind of statistic, shared by the per-group phases (true-sequential,
    # RTN) and the one-forward pass: the same products summed in the same order either way.
    def _col_accumulators(self, block, layer: str, gains: int | None) -> dict:
        """H (and with --fp-targets C) of ``layer``'s input; with ``gains`` the MLP-input layers'
        block-diagonal ``E[m m^T]``."""
        n_in = self.adapter_in_features(block, layer)
        I = self.adapter.intermediate_size
        return {"layer": layer,
                "H": self.sch.accumulator(f"H {layer}", (n_in, n_in)),
                "C": self.sch.accumulator(f"C {layer}", (n_in, n_in)) if self.qc.fp_targets else None,
                "m": {n: self.sch.accumulator(f"E[m m^T] {n}", (I // gains, gains, gains))
                      for n in self.adapter.mlp_in} if gains else None, "gains": gains}

    def _col_add(self, block, acc: dict, xa: torch.Tensor, xfa: torch.Tensor | None,
                 weights: torch.Tensor | None = None) -> None:
        """With ``weights`` (one per token, ``--residual-weights``) every sum is weighted by them."""
        if weights is not None:
            root = weights.sqrt().unsqueeze(-1)
            xa = xa * root
            xfa = None if xfa is None else xfa * root
        self.sch.accumulate(acc["H"], gram(xa))
        if xfa is not None:
            self.sch.accumulate(acc["C"], cross_gram(xfa, xa))
        if acc["m"] is not None:   # one sample at a time: the gains are I-wide float32 per token
            for xs in xa.split(1):
                for n, m in self.adapter.mlp_gains(block, xs).items():
                    self.sch.accumulate(acc["m"][n], gain_grams(m, acc["gains"]))

    def _col_settle(self, acc: dict, tokens: int) -> tuple:
        layer = acc["layer"]
        H = self.sch.settle(f"H {layer}", acc["H"]).div_(tokens)
        C = None if acc["C"] is None else self.sch.settle(f"C {layer}", acc["C"]).div_(tokens)
        S = None if acc["m"] is None else {n: self.sch.settle(f"E[m m^T] {n}", t).div_(tokens)
                                           for n, t in acc["m"].items()}
        return H, C, S

    def _attn_accumulators(self) -> dict:
        """H of q/k/v's input (and C), and for BoA the key and query Grams per KV head."""
        h, d = self.heads, self.heads.hidden_size
        boa = self.qc.method == "boa"
        return {"H": self.sch.accumulator("H qkv", (d, d)),
                "k": self.sch.accumulator("G_k", (h.n_kv_heads, h.head_dim, h.head_dim)) if boa else None,
                "q": self.sch.accumulator("G_q", (h.n_kv_heads, h.head_dim, h.head_dim)) if boa else None,
                "C": self.sch.accumulator("C qkv", (d, d)) if self.qc.fp_targets else None}

    def _attn_add(self, block, acc: dict, xa: torch.Tensor, xfa: torch.Tensor | None) -> None:
        self.sch.accumulate(acc["H"], gram(xa))
        if xfa is not None:
            self.sch.accumulate(acc["C"], cross_gram(xfa, xa))
        if acc["k"] is not None:
            st = self.adapter.attention_states(block, xa, self.kwargs)
            gk, gq = attention_grams(st, self.heads.n_rep)
            self.sch.accumulate(acc["k"], gk)
            self.sch.accumulate(acc["q"], gq)

    def _attn_settle(self, block, acc: dict, tokens: int) -> tuple:
        """``(H_qkv, C_qkv or None, (H_row_q, H_row_k) or None)``."""
        H_qkv = self.sch.settle("H qkv", acc["H"]).div_(tokens)
        C_qkv = None if acc["C"] is None else self.sch.settle("C qkv", acc["C"]).div_(tokens)
        rows = None
        if acc["k"] is not None:
            G_k = self.sch.settle("G_k", acc["k"]) / tokens
            G_q = self.sch.settle("G_q", acc["q"]) / tokens
            cos_sin = None
            if self.adapter.uses_rope:
                cos, sin = self.adapter.rope_cos_sin(self.kwargs, self.qc.seqlen)
                cos_sin = (self.sch.to_host(cos.float()), self.sch.to_host(sin.float()))
            q_norm, k_norm = self.adapter.qk_norm_weights(block)
            q_norm = None if q_norm is None else self.sch.to_host(q_norm)
            k_norm = None if k_norm is None else self.sch.to_host(k_norm)
            rows = qk_row_hessians(G_k, G_q, self.heads.n_rep, cos_sin, q_norm, k_norm)
        return H_qkv, C_qkv, rows

    def _column_hessian(self, block, store: ActivationStore, layer: str, phase: str, gains: int | None = None):
        """Mean ``x x^T`` of the inputs of ``layer`` over all calibration tokens (host, float32);
        with ``--fp-targets`` also the mean ``x_fp x^T``; with ``gains`` (a row-group size, for the
        MLP input) the block-diagonal ``E[m m^T]`` of every MLP-input layer (``mlp_stats``).
        Returns ``(H, C or None, {layer: E[m m^T]} or None)``."""
        t0 = time.perf_counter()
        with self._phase(phase), self._workspace(phase):
            acc = self._col_accumulators(block, layer, gains)
            tokens = 0
            for _, _, x, xf in self._pairs(store, self.plan.chunk):
                xa = capture_input(block, layer, x, self.kwargs)
                self._col_add(block, acc, xa, None if xf is None else capture_input(block, layer, xf, self.kwargs))
                tokens += xa.numel() // xa.shape[-1]
            out = self._col_settle(acc, tokens)
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - t0
        return out

    def _orders(self, boa: bool, search: bool) -> list:
        """(act_order_col, act_order_row) combinations to try: the configured one, or all of them."""
        if not search:
            return [(self.qc.act_order_col, self.qc.act_order_row)]
        return [(False, False), (True, False), (False, True), (True, True)] if boa else [(False, False), (True, False)]

    @staticmethod
    def adapter_in_features(block, layer: str) -> int:
        return block.get_submodule(layer).in_features

    # ----- statistics ---------------------------------------------------------------------
    def attention_statistics(self, block, store: ActivationStore):
        """Shared H_col of q/k/v, with ``--fp-targets`` its cross statistics ``C`` (else None),
        and, for BoA, the row Hessians of W_Q and W_K."""
        t0 = time.perf_counter()
        with self._phase(PHASE_ATTN), self._workspace(PHASE_ATTN):
            acc = self._attn_accumulators()
            tokens = 0
            for _, _, x, xf in self._pairs(store, self.plan.chunk):
                xa = capture_input(block, self.adapter.q_proj, x, self.kwargs)
                xfa = None if xf is None else capture_input(block, self.adapter.q_proj, xf, self.kwargs)
                self._attn_add(block, acc, xa, xfa)
                tokens += xa.numel() // xa.shape[-1]
            out = self._attn_settle(block, acc, tokens)
        self.phase_seconds[PHASE_ATTN] = time.perf_counter() - t0
        return out

    def one_pass_statistics(self, block, store: ActivationStore):
        """Every statistic of the block from one forward of the full-precision block per chunk
        (the default, one-pass order): the inputs of q/k/v, the out-projection, the MLP input and
        the MLP-output layer are recorded in a single run that stops at the last of them. With
        ``--fp-targets`` the fp stream's chunk runs through the whole block once: its recorded
        inputs give every ``C`` and its output is the fp stream's next block input. Returns
        ``(H_qkv, C_qkv, rows, {layer: (H, C, S)})`` -- the same sums as the per-group phases."""
        t0 = time.perf_counter()
        a = self.adapter
        later = [a.o_proj, a.mlp_in[0], a.mlp_out]
        layers = [a.q_proj, *later]
        gains = {a.mlp_in[0]: self.plan.inputs.mlp_row_group}
        with self._phase(PHASE_STATS), self._workspace(PHASE_STATS):
            attn = self._attn_accumulators()
            cols = {name: self._col_accumulators(block, name, gains.get(name)) for name in later}
            tokens = 0
            weight_sum = 0.0          # --residual-weights: the MLP-output layer's sums are weighted means
            for i0, i1, x, xf in self._pairs(store, self.plan.chunk):
                cap, out_q = capture_inputs(block, layers, x, self.kwargs, full=self.qc.residual_weights)
                weights = None
                if out_q is not None:
                    weights = residual_token_weights(out_q)
                    weight_sum += weights.double().sum().item()
                    del out_q
                capf = {}
                if xf is not None:
                    capf, out = capture_inputs(block, layers, xf, self.kwargs, full=True)
                    self.sch.store(store.fp_outputs, i0, i1, out)
                    del out
                self._attn_add(block, attn, cap[a.q_proj], capf.get(a.q_proj))
                for name in later:
                    self._col_add(block, cols[name], cap[name], capf.get(name),
                                  weights if name == a.mlp_out else None)
                tokens += x.numel() // x.shape[-1]
                del cap, capf
            H_qkv, C_qkv, rows = self._attn_settle(block, attn, tokens)
            early = {name: self._col_settle(cols[name], weight_sum if self.qc.residual_weights and name == a.mlp_out
                                            else tokens) for name in later}
        self.phase_seconds[PHASE_STATS] = time.perf_counter() - t0
        return H_qkv, C_qkv, rows, early

    def block_v_statistics(self, block, store: ActivationStore) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-KV-head ``X A^T A X^T`` (mean over tokens), a few query heads at a time; with
        ``--block-v-targets`` also the per-head cross statistics ``X_fp A_fp^T A X^T`` against the fp
        stream (its own attention maps), V's ``C`` (else None)."""
        t0 = time.perf_counter()
        h = self.heads
        g = self.plan.attn_heads
        cross = self.plan.inputs.block_v_targets
        H_v = torch.zeros(h.n_kv_heads, h.hidden_size, h.hidden_size)
        C_v = torch.zeros(h.n_kv_heads, h.hidden_size, h.hidden_size) if cross else None
        tokens = store.nsamples * self.qc.seqlen
        with self._phase(PHASE_BLOCK_V), self._workspace(PHASE_BLOCK_V):
            for h0 in range(0, h.n_heads, g):
                h1 = min(h0 + g, h.n_heads)
                kv0, kv1 = h0 // h.n_rep, h1 // h.n_rep
                acc = self.sch.device_zeros("block_v accumulator", (kv1 - kv0, h.hidden_size, h.hidden_size))
                acc_c = self.sch.device_zeros("block_v cross accumulator", (kv1 - kv0, h.hidden_size, h.hidden_size)) \
                    if cross else None
                for _, _, x, xf in self._pairs(store, self.plan.attn_chunk, fp=cross):
                    xa = capture_input(block, self.adapter.q_proj, x, self.kwargs)
                    st = self.adapter.attention_states(block, xa, self.kwargs)
                    if cross:
                        xfa = capture_input(block, self.adapter.q_proj, xf, self.kwargs)
                        stf = self.adapter.attention_states(block, xfa, self.kwargs)
                        gh, gc = block_v_cross_grams(xa, st, xfa, stf, h.n_rep, range(h0, h1))
                        acc += gh
                        acc_c += gc
                        del gh, gc, xfa, stf
                    else:
                        acc += block_v_grams(xa, st, h.n_rep, range(h0, h1))
                H_v[kv0:kv1] = self.sch.to_host(acc) / tokens
                del acc
                self.sch.free("block_v accumulator")
                if cross:
                    C_v[kv0:kv1] = self.sch.to_host(acc_c) / tokens
                    del acc_c
                    self.sch.free("block_v cross accumulator")
        self.phase_seconds[PHASE_BLOCK_V] = time.perf_counter() - t0
        return H_v, C_v

    # ----- solving ----------------------------------------------------------------------
    def retarget(self, block, name: str, target: tuple) -> tuple[dict, torch.Tensor | None]:
        """``--fp-targets``: replace ``block.<name>``'s weight by ``W + alpha W (C - H) (H + lam I)^-1``
        (``target = (H, C)``), whose symmetric objective equals ``||Q X~ - W X_fp||`` up to a
        constant (``solvers.target``); the solver then quantizes it as usual. Where the correction
        exceeds ``--fp-max-shift`` (``||W' - W|| > K alpha ||W||``) also returns the bounded target
        (alpha scaled down to the bound), the second candidate ``solve`` tries; else None. The info
        (for the layer's report): the correction's size ``fp_shift`` (and the bounded alpha)."""
        H, C = target
        lin = block.get_submodule(name)
        W = lin.weight.data
        info, bounded = {}, None
        bound = self.qc.fp_max_shift * self.qc.fp_alpha if self.qc.fp_max_shift else None
        with self._phase(PHASE_SOLVE), self.sch.workspace(f"fp target {name}", fp_target_workspace(*W.shape)):
            H_dev = self.sch.to_device(H, f"H fp-target {name}")
            C_dev = self.sch.to_device(C, f"C fp-target {name}")
            lin.weight.data = fp_target_weight(W, H_dev, C_dev, self.qc.percdamp, self.qc.fp_alpha, None, info)
            if bound is not None and info["fp_shift"] > bound:
                sub = {}
                bounded = fp_target_weight(W, H_dev, C_dev, self.qc.percdamp, self.qc.fp_alpha, bound, sub)
                info["fp_alpha_bounded"] = sub["fp_alpha_applied"]
            del H_dev, C_dev
            self.sch.free(f"H fp-target {name}")
            self.sch.free(f"C fp-target {name}")
        del info["fp_alpha_applied"]
        return info, bounded

    def solve(self, block, name: str, H_col: torch.Tensor | None, H_row: torch.Tensor | None = None,
              n_heads: int = 1, target: tuple | None = None) -> tuple[LayerReport, tuple]:
        """Quantize ``block.<name>`` in place on the device; return its report and codes.

        The Hessians are handed to the solver, which damps them in place; the relative errors
        in the report are measured with those damped Hessians (no extra copy on the device).
        With ``--search-orders`` the solver damps a copy instead, every act-order combination is
        solved, and the one with the lowest undamped objective is kept (``info["orders"]``). A layer
        whose fp-target correction exceeds ``--fp-max-shift`` is tried the same way on the bounded
        target too, every try scored against the full target (``info["fp_bounded_kept"]``).
        """
        t0 = time.perf_counter()
        qc = self.qc
        fp_info, bounded = {}, None
        if target is not None and target[1] is not None:
            fp_info, bounded = self.retarget(block, name, target)
        lin = block.get_submodule(name)
        W = lin.weight.data
        r, c = W.shape
        nh_col = 1 if H_col is None or H_col.dim() == 2 else H_col.shape[0]
        search = qc.search_orders and qc.method != "rtn"
        # more than one try (act-order combinations, the bounded fp target): the solver damps copies
        # of the Hessians, and every try is scored on the same (undamped) objective, against W
        tries = search or bounded is not None
        ws = solver_workspace(r, c, nh_col, W.element_size(), tries,
                              H_row.numel() * 4 if H_row is not None else 0)
        ws.pop("H_col (handed over)")
        common = dict(sym=qc.sym, grid=qc.qparam, group_size=qc.group_size, percdamp=qc.percdamp)
        if qc.grid_coarse > 1:
            common["coarse"] = qc.grid_coarse
        if qc.kquant:   # the layer's GGUF type: the k-quant, or its 32-column fallback
            common["kquant"] = layer_type(qc.kquant, c, name, qc.kquant_types, self.index)
        report = LayerReport(name=name, rows=r, cols=c, seconds=0.0)
        tags = []
        with self._phase(PHASE_SOLVE), self.sch.workspace(f"solver {name}", sum(ws.values())):
            H_dev = Hr_dev = None
            if H_col is not None:
                H_dev = self.sch.to_device(H_col, f"H_col {name}")
                tags.append(f"H_col {name}")
            if H_row is not None:
                Hr_dev = self.sch.to_device(H_row, f"H_row {name}")
                tags.append(f"H_row {name}")
            f32 = torch.float32  # objectives in float32: cheap on GPUs, and only compared or reported
            if qc.method == "rtn":
                res = rtn_quantize(W, qc.wbits, H_col=H_dev, **common)
            else:
                best, losses = None, {}
                targets = [("", W)] + ([("bounded ", bounded)] if bounded is not None else [])
                for prefix, Wt in targets:
                    for col, row in self._orders(H_row is not None, search):
                        if H_row is not None:
                            res = boa_quantize(Wt, H_dev, Hr_dev, n_heads, qc.wbits, act_order_col=col,
                                               act_order_row=row, block_size=qc.block_size,
                                               overwrite_hessians=not tries, follow_grids=qc.follow_grids,
                                               refine_sweeps=qc.refine_scales,
                                               joint_rows=joint_rows_for(r // n_heads, qc.joint_rows), **common)
                            loss = float(attention_loss(W, res.Q, H_dev, Hr_dev, f32))
                        else:
                            res = gptq_quantize(Wt, H_dev, qc.wbits, act_order=col, block_size=qc.block_size,
                                                overwrite_hessians=not tries, refine_sweeps=qc.refine_scales,
                                                **common)
                            # 2RC^2 flops: only if compared
                            loss = float(layer_loss(W, res.Q, H_dev, f32)) if tries else None
                        tag = prefix + ("+".join(n for n, on in (("col", col), ("row", row)) if on) or "none")
                        losses[tag] = loss
                        if best is None or (loss is not None and loss < best[1]):
                            best = (res, loss, tag)
                        del res
                res = best[0]
                if search:
                    res.info["orders"] = best[2].removeprefix("bounded ")
                    res.info["order_losses"] = losses
                if bounded is not None:   # which target won, and each one's best objective
                    fp_info["fp_bounded_kept"] = best[2].startswith("bounded ")
                    fp_info["fp_loss_full"] = min(v for k, v in losses.items() if not k.startswith("bounded "))
                    fp_info["fp_loss_bounded"] = min(v for k, v in losses.items() if k.startswith("bounded "))
                if H_row is not None:
                    report.rel_attention_error = _rel(best[1], attention_loss(W, torch.zeros_like(W), H_dev, Hr_dev,
                                                                              f32))
            if H_dev is not None:
                num = best[1] if tries and H_row is None else layer_loss(W, res.Q, H_dev, f32)
                report.rel_error = _rel(num, layer_loss(W, torch.zeros_like(W), H_dev, f32))
            del H_dev, Hr_dev
            for tag in tags:
                self.sch.free(tag)
            lin.weight.data = res.Q
        report.seconds = time.perf_counter() - t0
        report.info = {**{k: v for k, v in res.info.items() if not isinstance(v, list)}, **fp_info}
        quant = (self.sch.to_host(res.codes), self.sch.to_host(res.scale.float()), self.sch.to_host(res.zero.float()))
        if res.kquant is not None:   # the k-quant fields the GGUF file stores
            quant += ({k: v if v is None or isinstance(v, str) else self.sch.to_host(v) for k, v in res.kquant.items()},)
        return report, quant

    # ----- the whole block --------------------------------------------------------------
    def quantize(self, block, store: ActivationStore | None) -> BlockOutcome:
        t0 = time.perf_counter()
        a, h, qc = self.adapter, self.heads, self.qc
        reports, quant = [], {}

        def record(name, out):
            reports.append(out[0])
            quant[name] = out[1]

        if qc.method == "rtn":
            # RTN needs statistics only for a Hessian grid (then true-sequentially, like GPTQ)
            phases = {a.q_proj: PHASE_ATTN, a.k_proj: PHASE_ATTN, a.v_proj: PHASE_ATTN, a.o_proj: PHASE_OUT,
                      a.mlp_out: PHASE_MLP_OUT, **{n: PHASE_MLP_IN for n in a.mlp_in}}
            for name in a.linear_names():
                H = self._column_hessian(block, store, name, phases[name])[0] if qc.qparam == "hessian" else None
                record(name, self.solve(block, name, H))
        else:
            # true-sequential: each group's statistics come from the block with the layers
            # before it already quantized; otherwise all of them come from one pass over the
            # full-precision block (the official BoA code's order)
            later = {a.o_proj: PHASE_OUT, a.mlp_in[0]: PHASE_MLP_IN, a.mlp_out: PHASE_MLP_OUT}
            # BoA's MLP row Hessians: the row-group size the plan budgeted (None: off)
            gains = {a.mlp_in[0]: self.plan.inputs.mlp_row_group}
            if qc.true_sequential:
                if qc.fp_targets:   # (the configuration refuses this pair; kept for completeness)
                    self.phase_seconds[PHASE_FP_PROPAGATE] = self.propagate(block, store, fp=True)
                H_qkv, C_qkv, rows = self.attention_statistics(block, store)
                early = {}
            else:   # one forward per chunk gives every group's statistics (and the fp stream's output)
                H_qkv, C_qkv, rows, early = self.one_pass_statistics(block, store)
            H_v, C_v = self.block_v_statistics(block, store) if qc.method == "boa" and qc.block_v else (H_qkv, None)

            def col_stats(name):
                return early.pop(name) if name in early else \
                    self._column_hessian(block, store, name, later[name], gains.get(name))

            qkv_target = (H_qkv, C_qkv)
            # V under block_v: corrected with the plain q/k/v statistics, or with --block-v-targets per head
            # with its own attention-weighted ones
            v_target = (H_v, C_v) if C_v is not None else qkv_target
            if qc.method == "boa":
                H_row_q, H_row_k = rows
                if qc.v_row_hessian:
                    W_o = block.get_submodule(a.o_proj).weight.data
                    H_row_v = self.sch.to_host(wout_row_hessian(W_o, h.n_heads, h.n_kv_heads, h.head_dim))
                else:   # identity: V per head with GPTQ on its own H_col (the official code's V)
                    H_row_v = torch.eye(h.head_dim).expand(h.n_kv_heads, -1, -1).contiguous()
                record(a.q_proj, self.solve(block, a.q_proj, H_qkv, H_row_q, h.n_heads, qkv_target))
                record(a.k_proj, self.solve(block, a.k_proj, H_qkv, H_row_k, h.n_kv_heads, qkv_target))
                record(a.v_proj, self.solve(block, a.v_proj, H_v, H_row_v, h.n_kv_heads, v_target))
            else:
                for name in (a.q_proj, a.k_proj, a.v_proj):
                    record(name, self.solve(block, name, H_qkv, target=qkv_target))
            H_o, C_o, _ = col_stats(a.o_proj)
            record(a.o_proj, self.solve(block, a.o_proj, H_o, target=(H_o, C_o)))
            H_in, C_in, S = col_stats(a.mlp_in[0])
            if S is not None:   # BoA with --mlp-row-hessian: through the (still fp) MLP-output weight
                W_out = block.get_submodule(a.mlp_out).weight.data
                for name in a.mlp_in:
                    H_row = self.sch.to_host(mlp_row_hessian(S.pop(name), W_out, qc.mlp_row_damp))
                    record(name, self.solve(block, name, H_in, H_row, H_row.shape[0], (H_in, C_in)))
            else:
                for name in a.mlp_in:
                    record(name, self.solve(block, name, H_in, target=(H_in, C_in)))
            H_out, C_out, _ = col_stats(a.mlp_out)
            record(a.mlp_out, self.solve(block, a.mlp_out, H_out, target=(H_out, C_out)))
        return BlockOutcome(weights=self.sch.host_state(block), quant=quant, layers=reports,
                            seconds=time.perf_counter() - t0, phase_seconds=dict(self.phase_seconds))

    def propagate(self, block, store: ActivationStore, fp: bool = False) -> float:
        """Run the block over all calibration inputs into the output slot: the (quantized) block
        on the quantized model's stream, or with ``fp`` the full-precision block on the fp stream."""
        t0 = time.perf_counter()
        phase = PHASE_FP_PROPAGATE if fp else PHASE_PROPAGATE
        src, dst = (store.fp_inputs, store.fp_outputs) if fp else (store.inputs, store.outputs)
        with self._phase(phase), self.sch.workspace(f"workspace: {phase}", workspace_bytes(self.plan.phase(PHASE_PROPAGATE))):
            for i0, i1, x in self.sch.chunks(src, self.plan.chunk):
                self.sch.store(dst, i0, i1, block_forward(block, x, self.kwargs))
        dt = time.perf_counter() - t0
        self.phase_seconds[phase] = dt
        return dt


def _rel(num: torch.Tensor, den: torch.Tensor) -> float:
    den = float(den)
    return float(num) / den if den > 0 else 0.0
