"""Pure aggregation maths for federated LoRA (interim minimal version; see tests/test_lora_math.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch


def _normalise(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not weights or not math.isfinite(total) or total <= 0:
        raise ValueError(f"weights must be finite with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Σ_k p_k state_k per key, p_k = w_k / Σ w (float64 accumulation)."""
    p = _normalise(weights)
    keys = set(states[0])
    out: dict[str, torch.Tensor] = {}
    for k in sorted(keys):
        acc = torch.zeros(states[0][k].shape, dtype=torch.float64)
        for s, pk in zip(states, p, strict=True):
            if set(s) != keys:
                raise ValueError(f"states have different keys, e.g. {sorted(set(s) ^ keys)[:1]}")
            if s[k].shape != acc.shape:
                raise ValueError(f"key {k!r} has shapes {tuple(s[k].shape)} and {tuple(acc.shape)}")
            acc += pk * s[k].double()
        out[k] = acc.to(states[0][k].dtype)
    return out


def ideal_update(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """ΔW = Σ_k p_k B_k A_k."""
    p = _normalise(weights)
    acc = sum(pk * (b.double() @ a.double()) for a, b, pk in zip(As, Bs, p, strict=True))
    return torch.as_tensor(acc).float()


def relative_residual(
    delta_w: torch.Tensor, B: torch.Tensor, A: torch.Tensor, R: torch.Tensor | None = None
) -> tuple[float, float]:
    """(‖ΔW − B·A‖², ‖ΔW‖²) (B·R·A with R)."""
    prod = B.double() @ (R.double() @ A.double() if R is not None else A.double())
    return float(((delta_w.double() - prod) ** 2).sum()), float((delta_w.double() ** 2).sum())


def combine_residuals(parts: Iterable[tuple[float, float]]) -> float:
    """sqrt(Σ num / Σ den) over modules (0 when Σ den is 0)."""
    num = den = 0.0
    for n, d in parts:
        num, den = num + n, den + d
    return math.sqrt(num / den) if den > 0 else 0.0
