"""Attention-aware Hessian statistics of one transformer block (Table 1 of the BoA paper).

Pure tensor functions on one chunk of calibration data; the pipeline sums them over chunks
(float32) and the scheduler decides where the sums live. With ``X`` the block's attention
input (tokens as rows here), per head ``h``:

* ``H_col`` of q/k/v (shared): ``sum_t x_t x_t^T``;
* row Hessian of ``W_Q,h``: ``K_h^T K_h`` (relaxed eq. 15), of ``W_K,h``: ``Q_h^T Q_h`` (eq. 16),
  with post-norm, post-RoPE ``Q``/``K`` expressed in the coordinates of the projection's
  output rows (``rope_average``); under grouped-query attention query head ``h`` uses KV head
  ``h // n_rep`` and the row Hessian of a KV head sums the queries of its ``n_rep`` heads;
* ``block_v``: per-head ``H_col`` of ``W_V,h`` = ``X A_h^T A_h X^T`` and row Hessian
  ``W_out,h^T W_out,h``; for a KV head shared by several query heads, both factors are summed
  over those heads (exact without GQA; a Kronecker approximation of the sum with it).

See docs/design.md ("Attention statistics") for the derivations.
"""

from __future__ import annotations

import torch

from ..models.base import AttentionStates


def gram(x: torch.Tensor) -> torch.Tensor:
    """``sum_t x_t x_t^T`` over all leading dims of ``x`` (``(..., d)``), in float32."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    return x2.T @ x2


def cross_gram(x_fp: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_t x_fp,t x_t^T`` (``C`` of ``--fp-targets``): the full-precision model's layer input
    against the quantized model's, token by token, in float32."""
    a = x_fp.reshape(-1, x_fp.shape[-1]).float()
    b = x.reshape(-1, x.shape[-1]).float()
    return a.T @ b


def attention_grams(states: AttentionStates, n_rep: int):
    """Per KV head: ``G_k = sum k k^T`` and ``G_q = sum over its query heads of q q^T``.

    Returns two ``(n_kv_heads, head_dim, head_dim)`` float32 tensors.
    """
    k, q = states.k.float(), states.q.float()
    B, Hkv, L, dh = k.shape
    G_k = torch.einsum("bhli,bhlj->hij", k, k)
    qg = q.reshape(B, Hkv, n_rep, L, dh)
    G_q = torch.einsum("bhrli,bhrlj->hij", qg, qg)
    return G_k, G_q


def rope_average(G: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``mean_t R_t^T G R_t`` for the rotations ``R_t`` of positions ``t = 0..L-1``.

    ``R_t x = cos_t * x + sin_t * rotate_half(x)`` (Hugging Face convention), i.e.
    ``R_t = D(c_t) + D(s_t) J`` with ``J x = rotate_half(x)``. Hence
    ``mean_t R_t^T G R_t = G*Ccc + (G*Ccs) J + J^T (G*Csc) + J^T (G*Css) J`` where
    ``Cab[i, j] = mean_t a_t[i] b_t[j]`` and ``*`` is the element-wise product. ``G`` is
    ``(..., dh, dh)``, ``cos``/``sin`` are ``(L, dh)``.
    """
    c, s = cos.double(), sin.double()
    L = c.shape[0]
    Ccc, Ccs = c.T @ c / L, c.T @ s / L
    Csc, Css = s.T @ c / L, s.T @ s / L
    dh = G.shape[-1]
    half = dh // 2
    J = torch.zeros(dh, dh, dtype=torch.float64, device=G.device)
    J[:half, half:] = -torch.eye(half, dtype=torch.float64, device=G.device)
    J[half:, :half] = torch.eye(half, dtype=torch.float64, device=G.device)
    G64 = G.double()
    out = G64 * Ccc + (G64 * Ccs) @ J + J.T @ (G64 * Csc) + J.T @ (G64 * Css) @ J
    return out.to(G.dtype)


def qk_row_hessians(G_k: torch.Tensor, G_q: torch.Tensor, n_rep: int, cos_sin=None,
                    q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None):
    """Row Hessians of W_Q (``(n_heads, dh, dh)``) and W_K (``(n_kv_heads, dh, dh)``).

    With RoPE the key/query Grams are averaged over positions (``rope_average``); with
    per-head RMSNorms on q/k (Qwen3) their weights ``g`` enter as ``D(g) . D(g)`` (the norm's
    Jacobian with the per-token ``1/rms`` treated as a constant and the projection onto the
    normalised vector dropped).
    """
    if cos_sin is not None:
        G_k = rope_average(G_k, *cos_sin)
        G_q = rope_average(G_q, *cos_sin)
    H_q = G_k.repeat_interleave(n_rep, dim=0)  # query head h sees the keys of KV head h // n_rep
    H_k = G_q
    if q_norm is not None:
        H_q = q_norm[:, None] * H_q * q_norm[None, :]
    if k_norm is not None:
        H_k = k_norm[:, None] * H_k * k_norm[None, :]
    return H_q, H_k


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, first: int = 0) -> torch.Tensor:
    """``softmax(q k^T * scaling)`` with a causal mask, float32. ``q``: ``(B, g, Lq, dh)``, the queries
    of positions ``first .. first + Lq - 1``; ``k``: ``(B, g, Lk, dh)``, the keys of positions ``0 .. Lk - 1``."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    Lq, Lk = scores.shape[-2:]
    mask = torch.ones(Lq, Lk, dtype=torch.bool, device=scores.device).triu_(first + 1)   # key u > query t
    scores.masked_fill_(mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def block_v_row_chunk(L: int) -> int:
    """Query positions ``block_v_grams`` forms at once by default: an eighth of the window, at least 64."""
    return min(L, max(64, -(-L // 8)))


def _block_v_rows(x: torch.Tensor, states: AttentionStates, n_rep: int, heads: range, row_chunk: int | None):
    """The rows ``Y = A_h X`` of the query heads ``heads``, ``row_chunk`` query positions at a time,
    each against only the keys it can see; yields ``(n_kv_in_range, B * n_rep * rows, d)`` float32."""
    if heads.start % n_rep or heads.stop % n_rep:
        raise ValueError("block_v head chunks must cover whole KV-head groups")
    xf = x.float()
    kv_idx = torch.arange(heads.start, heads.stop, device=x.device) // n_rep
    q, k = states.q[:, heads.start:heads.stop].float(), states.k[:, kv_idx].float()
    B, g, L, _ = q.shape
    d = xf.shape[-1]
    c = row_chunk or block_v_row_chunk(L)
    for s in range(0, L, c):
        e = min(L, s + c)
        A = causal_attention_probs(q[:, :, s:e], k[:, :, :e], states.scaling, first=s)   # (B, g, e-s, e)
        Y = torch.matmul(A, xf[:, None, :e])                                               # (B, g, e-s, d)
        yield Y.reshape(B, g // n_rep, n_rep, e - s, d).transpose(0, 1).reshape(g // n_rep, -1, d)


def block_v_grams(x: torch.Tensor, states: AttentionStates, n_rep: int, heads: range,
                  row_chunk: int | None = None) -> torch.Tensor:
    """Partial ``sum X A_h^T A_h X^T`` for the query heads ``heads`` (a range), summed per KV head.

    ``x`` is the attention input ``(B, L, d)``. Returns ``(n_kv_in_range, d, d)`` float32 for the
    KV heads ``heads.start // n_rep .. (heads.stop - 1) // n_rep``; the range must cover whole
    KV-head groups. The rows ``Y = A_h X`` (``y_t = sum_u A[t,u] x_u``) are formed ``row_chunk``
    query positions at a time (default ``block_v_row_chunk``), each against only the
    keys it can see (``u <= t``): the causal mask's zero half of ``A`` is never computed, which
    halves the scores and the ``A X`` products (the ``Y^T Y`` Grams are the same either way), and
    only ``row_chunk`` rows of ``len(heads)`` attention maps are held at once.
    """
    out = None
    for Y in _block_v_rows(x, states, n_rep, heads, row_chunk):
        out = Y.transpose(1, 2) @ Y if out is None else out + Y.transpose(1, 2) @ Y
    return out


def block_v_cross_grams(x: torch.Tensor, states: AttentionStates, x_fp: torch.Tensor, states_fp: AttentionStates,
                        n_rep: int, heads: range, row_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_v_grams`` of the quantized model's stream and, with ``--fp-targets``, its cross statistics
    against the full-precision model's: ``(sum Y_h^T Y_h, sum Y_fp,h^T Y_h)`` per KV head, where
    ``Y_h = A_h X`` on the quantized stream and ``Y_fp,h = A_fp,h X_fp`` with the fp stream's own
    attention maps -- the ``H`` and ``C`` of V's attention-weighted target
    ``sum_h ||W X_fp A_fp,h^T - Q X A_h^T||^2`` (``cross_gram`` per head, through attention)."""
    H = C = None
    for Y, Yf in zip(_block_v_rows(x, states, n_rep, heads, row_chunk),
                     _block_v_rows(x_fp, states_fp, n_rep, heads, row_chunk)):
        h, c = Y.transpose(1, 2) @ Y, Yf.transpose(1, 2) @ Y
        H, C = (h, c) if H is None else (H + h, C + c)
    return H, C


def wout_row_hessian(W_o: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """``sum over query heads h of KV head j of W_out,h^T W_out,h``: ``(n_kv_heads, dh, dh)``.

    ``W_o`` is the out-projection weight ``(d, n_heads * head_dim)``; head ``h`` owns its
    columns ``h*head_dim:(h+1)*head_dim``.
    """
    Wh = W_o.float().reshape(W_o.shape[0], n_heads, head_dim).transpose(0, 1)  # (H, d, dh)
    per_head = Wh.transpose(1, 2) @ Wh                                          # (H, dh, dh)
    return per_head.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, head_dim).sum(1)
