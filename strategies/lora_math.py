"""Pure aggregation maths for federated LoRA (interim minimal version; see tests/test_lora_math.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from fl.adapters import module_factors


def _normalise(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not weights or not math.isfinite(total) or total <= 0:
        raise ValueError(f"weights must be finite with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
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


def ideal_update(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
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


def _check_fair_shapes(delta_w: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor) -> None:
    d_out, d_in = delta_w.shape
    if A_bar.shape[1] != d_in or B_bar.shape[0] != d_out or A_bar.shape[0] != B_bar.shape[1]:
        raise ValueError(
            f"shape mismatch: delta_w {tuple(delta_w.shape)}, A_bar {tuple(A_bar.shape)} (r x d_in), "
            f"B_bar {tuple(B_bar.shape)} (d_out x r)"
        )


def fair_correction_sgd(
    delta_w: torch.Tensor,
    A_bar: torch.Tensor,
    B_bar: torch.Tensor,
    *,
    lam: float = 0.01,
    lr: float = 1e-2,
    steps: int = 1000,
) -> torch.Tensor:
    """LoRA-FAIR's correction (Bian et al., ICCV 2025, arXiv 2411.14961) by gradient descent.

    Minimises S(ΔW, (B̄ + ΔB)·Ā) + λ‖ΔB‖²_F from ΔB = 0 with plain gradient descent (`torch.optim.SGD`),
    S = 1 − cosine similarity of the flattened matrices. Returns B̄' = B̄ + ΔB* (float32).

    S is scale-invariant, so its gradient grows as 1/‖B̄Ā‖: in early rounds, when B̄ ≈ 0, a fixed step
    diverges (measured: residual 5.3 vs 0.26 before the correction, for B̄ entries ~1e-3). We therefore
    solve in units of ‖B̄‖_F — B̄ + ΔB = ‖B̄‖·(B̄/‖B̄‖ + Δ), penalty λ‖Δ‖² — which leaves S unchanged and
    makes `lr` and `lam` independent of the adapter's scale. For ‖B̄‖_F = 1 this is the paper's objective.
    """
    _check_fair_shapes(delta_w, A_bar, B_bar)
    target = delta_w.detach().double().flatten()
    a, b = A_bar.detach().double(), B_bar.detach().double()
    scale = float(b.norm())
    if scale == 0.0:
        return B_bar.detach().float().clone()  # cos(ΔW, 0) is undefined: nothing to correct from
    unit = b / scale
    delta = torch.zeros_like(b, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        approx = ((unit + delta) @ a).flatten()
        loss = 1 - torch.nn.functional.cosine_similarity(approx, target, dim=0) + lam * (delta**2).sum()
        loss.backward()
        opt.step()
    return (scale * (unit + delta.detach())).float()


def fair_correction_closed_form(
    delta_w: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor, *, lam: float = 0.01
) -> torch.Tensor:
    """Closed-form ridge variant of LoRA-FAIR's correction.

    Solves min_ΔB ‖ΔW − (B̄ + ΔB)Ā‖²_F + λ‖ΔB‖²_F, whose minimiser is
    B̄' = (ΔW Āᵀ + λ B̄)(Ā Āᵀ + λ I)⁻¹ — the penalty is on ΔB, not on B̄'; with λ → 0 it is the
    least-squares projection of ΔW onto the row space of Ā. One r × r solve (float64 inside).
    """
    _check_fair_shapes(delta_w, A_bar, B_bar)
    a, b, dw = A_bar.double(), B_bar.double(), delta_w.double()
    r = a.shape[0]
    gram = a @ a.T + lam * torch.eye(r, dtype=torch.float64)
    rhs = dw @ a.T + lam * b  # d_out x r;  B' gram = rhs  <=>  gram B'^T = rhs^T (gram symmetric)
    return torch.linalg.solve(gram, rhs.T).T.float()


def fedsb_init_factors(grad: torch.Tensor, *, rank: int, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fed-SB initialisation (Singhal et al., 2025, arXiv 2502.15436) for one module.

    G̃ = −lr·sign(G); truncated SVD G̃ᵀ ≈ U S Vᵀ; A = Uᵀ[:r] (r × d_in), B = V[:, :r] (d_out × r),
    R0 = diag(S[:r]), so B·R0·A is the best rank-r approximation of G̃. Exact SVD (deterministic),
    where the authors use the randomised `torch.svd_lowrank`.
    """
    d_out, d_in = grad.shape
    if not 0 < rank <= min(d_out, d_in):
        raise ValueError(f"rank={rank} must be in [1, min(d_out, d_in)={min(d_out, d_in)}]")
    g_tilde = -lr * torch.sign(grad.double())
    U, S, Vh = torch.linalg.svd(g_tilde.T, full_matrices=False)
    A = U[:, :rank].T
    B = Vh[:rank].T
    return A.float().contiguous(), B.float().contiguous(), torch.diag(S[:rank]).float()


# ---------------------------------------------------------------------------- FedEx-LoRA
def _ideal_update64(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_k p_k B_k A_k in float64 (`ideal_update` rounds to float32, too coarse for a residual of 1e-6)."""
    p = _normalise(weights)
    return torch.as_tensor(sum(pk * (b.double() @ a.double()) for a, b, pk in zip(As, Bs, p, strict=True)))


def fedex_residual(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    A_bar: torch.Tensor,
    B_bar: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """FedEx-LoRA's residual (Singhal et al., ACL 2025, arXiv 2410.09432) for one module.

    E = s·(Σ_k p_k B_k A_k − B̄·Ā), with s the LoRA scaling (alpha / rank) and Ā, B̄ the factors the
    server broadcasts. Folding E into the frozen W0 makes the global model exact:
    W0 + E + s·B̄·Ā = Σ_k p_k (W0 + s·B_k·A_k). float64 inside, float32 out (d_out × d_in).
    """
    dw = _ideal_update64(As, Bs, weights)
    return (scaling * (dw - B_bar.double() @ A_bar.double())).float()


def fedex_fold_residual(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    A_bar: torch.Tensor,
    B_bar: torch.Tensor,
    E: torch.Tensor,
    scaling: float,
) -> tuple[float, float]:
    """(‖s·ΣpBA − (s·B̄Ā + E)‖², ‖s·ΣpBA‖²): what is left of the gap after folding E (for `combine_residuals`)."""
    target = scaling * _ideal_update64(As, Bs, weights)
    got = scaling * (B_bar.double() @ A_bar.double()) + E.double()
    return float(((target - got) ** 2).sum()), float((target**2).sum())


def aggregation_residual(
    fixed: Mapping[str, torch.Tensor],
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    agg: Mapping[str, torch.Tensor],
) -> float:
    """‖Σ p_k B_k A_k − B̄Ā‖ / ‖Σ p_k B_k A_k‖ over every adapted module (0 = exact), with the frozen factors
    `fixed` (FFA's A, Fed-SB's A and B) completing each client's and the aggregate's tensors."""
    per_client = [module_factors({**fixed, **s}) for s in states]
    parts = []
    for prefix, (b_bar, a_bar) in module_factors({**fixed, **agg}).items():
        dw = ideal_update([f[prefix][1] for f in per_client], [f[prefix][0] for f in per_client], weights)
        parts.append(relative_residual(dw, b_bar, a_bar))
    return combine_residuals(parts)
