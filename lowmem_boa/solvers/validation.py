"""Input checks shared by every solver.

Every public solver validates its arguments *before* doing any work and raises
``ValueError`` with a message that names the offending argument, so a bad call
never produces a silently wrong result (e.g. "INT3" running on a 4-bit grid).
"""

from __future__ import annotations

import numbers

import torch

GRIDS = ("minmax", "mmse", "hessian")


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return bits


def check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    return grid


def check_sym(sym) -> bool:
    if not isinstance(sym, bool):
        raise ValueError(f"sym must be a bool, got {sym!r}")
    return sym


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_group_size(group_size, d_col: int):
    """``None``, 0 or -1 mean one group per row (per-channel)."""
    if group_size is None or (not isinstance(group_size, bool) and group_size in (0, -1)):
        return None
    group_size = check_positive_int("group_size", group_size)
    if group_size >= d_col:
        return None
    return group_size


def check_percdamp(percdamp) -> float:
    try:
        value = float(percdamp)
    except (TypeError, ValueError):
        raise ValueError(f"percdamp must be a non-negative number, got {percdamp!r}") from None
    if not (value >= 0.0 and value < float("inf")):
        raise ValueError(f"percdamp must be a finite non-negative number, got {percdamp!r}")
    return value


def check_weight(W) -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (d_row, d_col), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"W must not be empty, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("W contains NaN or Inf")
    return W


def _check_finite_square(name: str, H, n: int) -> None:
    if not isinstance(H, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(H).__name__}")
    if not H.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {H.dtype}")
    if H.shape[-1] != H.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dims, got shape {tuple(H.shape)}")
    if H.shape[-1] != n:
        raise ValueError(f"{name} is {H.shape[-1]}x{H.shape[-1]} but must be {n}x{n} to match W")
    if not torch.isfinite(H).all():
        raise ValueError(f"{name} contains NaN or Inf")
    Hf = H.float()
    asym = (Hf - Hf.transpose(-1, -2)).abs().amax()
    scale = Hf.abs().amax().clamp_min(1e-30)
    if asym > 1e-3 * scale:
        raise ValueError(f"{name} is not symmetric (max |H - H^T| = {float(asym):.3g})")


def check_col_hessian(H_col, d_col: int, n_heads: int = 1, name: str = "H_col") -> torch.Tensor:
    """``H_col`` is ``(d_col, d_col)`` shared, or ``(n_heads, d_col, d_col)`` per head."""
    if not isinstance(H_col, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(H_col).__name__}")
    if H_col.dim() == 3:
        if H_col.shape[0] != n_heads:
            raise ValueError(
                f"{name} has {H_col.shape[0]} per-head blocks but W has {n_heads} heads "
                f"(shape {tuple(H_col.shape)}); pass (d_col, d_col) for a shared Hessian")
    elif H_col.dim() != 2:
        raise ValueError(f"{name} must be (d_col, d_col) or (n_heads, d_col, d_col), "
                         f"got shape {tuple(H_col.shape)}")
    _check_finite_square(name, H_col, d_col)
    return H_col


def check_heads(W: torch.Tensor, n_heads) -> tuple[int, int]:
    n_heads = check_positive_int("n_heads", n_heads)
    if W.shape[0] % n_heads:
        raise ValueError(f"W has {W.shape[0]} rows, which do not divide into n_heads={n_heads} heads")
    return n_heads, W.shape[0] // n_heads


def check_row_hessian(H_row, n_heads: int, head_dim: int) -> torch.Tensor:
    if not isinstance(H_row, torch.Tensor):
        raise ValueError(f"H_row must be a torch.Tensor, got {type(H_row).__name__}")
    if H_row.dim() != 3 or H_row.shape[0] != n_heads:
        raise ValueError(f"H_row must be (n_heads, head_dim, head_dim) = ({n_heads}, {head_dim}, {head_dim}), "
                         f"got shape {tuple(H_row.shape)}")
    _check_finite_square("H_row", H_row, head_dim)
    return H_row


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (used by the exactness tests), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
