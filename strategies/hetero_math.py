"""Pure maths for federations whose clients train LoRA at different ranks (FLoRA, FlexLoRA, HetLoRA).

Per adapted module client k holds B_k (d_out × r_k) and A_k (r_k × d_in) with LoRA scaling s_k (PEFT's
alpha / r_k), so its update is s_k·B_k·A_k; p_k are the normalised aggregation weights. Every function takes
and returns plain tensors (float64 inside, float32 out) and is tested on its own (tests/test_hetero_math.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _normalise(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not weights or not math.isfinite(total) or total <= 0:
        raise ValueError(f"weights must be finite with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def _scalings(scalings: Sequence[float] | None, n: int) -> list[float]:
    return [1.0] * n if scalings is None else [float(s) for s in scalings]


def weighted_product(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    scalings: Sequence[float] | None = None,
) -> torch.Tensor:
    """ΔW = Σ_k p_k s_k B_k A_k (d_out × d_in, float64): the update every heterogeneous method aims at."""
    p, s = _normalise(weights), _scalings(scalings, len(As))
    return torch.as_tensor(sum(pk * sk * (b.double() @ a.double()) for a, b, pk, sk in zip(As, Bs, p, s, strict=True)))


# ---------------------------------------------------------------------------- FLoRA
def flora_stack(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    scalings: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking (Wang et al., NeurIPS 2024, arXiv 2409.05976): B = [p_1 s_1 B_1 … p_K s_K B_K]
    (d_out × Σ r_k), A = [A_1; …; A_K] (Σ r_k × d_in), so B·A = Σ_k p_k s_k B_k A_k exactly (no cross terms).
    Returns (B, A), float32."""
    p, s = _normalise(weights), _scalings(scalings, len(As))
    for a, b in zip(As, Bs, strict=True):
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"A {tuple(a.shape)} and B {tuple(b.shape)} have different ranks")
    B = torch.cat([pk * sk * b.double() for b, pk, sk in zip(Bs, p, s, strict=True)], dim=1)
    A = torch.cat([a.double() for a in As], dim=0)
    return B.float(), A.float()


# ---------------------------------------------------------------------------- FlexLoRA
def truncated_factors(delta_w: torch.Tensor, rank: int, *, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors of ΔW (Eckart–Young): B = U_r Σ_r^{1/2} / s, A = Σ_r^{1/2} V_rᵀ, so that
    s·B·A = U_r Σ_r V_rᵀ, the truncated SVD (FlexLoRA, Bai et al., NeurIPS 2024, arXiv 2402.11505). Returns (B, A)."""
    d_out, d_in = delta_w.shape
    if not 0 < rank <= min(d_out, d_in):
        raise ValueError(f"rank={rank} must be in [1, min(d_out, d_in)={min(d_out, d_in)}]")
    U, S, Vh = torch.linalg.svd(delta_w.double(), full_matrices=False)
    root = S[:rank].sqrt()
    B = U[:, :rank] * root / float(scaling)
    A = root[:, None] * Vh[:rank]
    return B.float().contiguous(), A.float().contiguous()


# ---------------------------------------------------------------------------- HetLoRA
def zero_pad(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad B (d_out × r) with zero columns and A (r × d_in) with zero rows up to `rank` (HetLoRA's r_max); the
    product B·A is unchanged."""
    r = A.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}; use truncate")
    return (
        torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1),
        torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0),
    )


def truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `rank` components: B[:, :rank], A[:rank] (HetLoRA's way down to a client of rank r_k)."""
    if rank > A.shape[0]:
        raise ValueError(f"cannot truncate rank {A.shape[0]} up to {rank}; use zero_pad")
    return B[:, :rank].contiguous(), A[:rank].contiguous()


def sparsity_weights(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> list[float]:
    """HetLoRA's sparsity-weighted aggregation (Cho et al., EMNLP 2024, arXiv 2401.06432): client k weighs
    ‖B_k A_k‖_F / Σ_j ‖B_j A_j‖_F (uniform when every product is zero)."""
    norms = [float((b.double() @ a.double()).norm()) for a, b in zip(As, Bs, strict=True)]
    total = sum(norms)
    return [1.0 / len(norms)] * len(norms) if total == 0 else [n / total for n in norms]


def hetlora_aggregate(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad every client's factors to `rank` (r_max) and average them with `weights` (normalised):
    B̄ = Σ p_k pad(B_k), Ā = Σ p_k pad(A_k). Returns (B̄, Ā), float32."""
    p = _normalise(weights)
    padded = [zero_pad(b.double(), a.double(), rank) for a, b in zip(As, Bs, strict=True)]
    B = sum(pk * pb for (pb, _), pk in zip(padded, p, strict=True))
    A = sum(pk * pa for (_, pa), pk in zip(padded, p, strict=True))
    return torch.as_tensor(B).float(), torch.as_tensor(A).float()


def tail_norm(B: torch.Tensor, A: torch.Tensor, keep: int) -> float:
    """‖B[:, keep:] A[keep:]‖_F: what the components a pruning to `keep` would drop contribute."""
    return float((B[:, keep:].double() @ A[keep:].double()).norm())


def prune_keep(rank: int, gamma: float) -> int:
    """The rank a pruning step keeps: ⌊γ r⌋, at least 1."""
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma={gamma} must be in (0, 1]")
    return max(1, math.floor(gamma * rank))


def prune_decision(rank: int, *, gamma: float, tail: float, previous: float | None) -> int:
    """HetLoRA's self-pruning rule: drop to `prune_keep(rank, gamma)` when the trailing components' norm `tail` is
    smaller than a round before (`previous`; None: no earlier round at this rank, keep)."""
    keep = prune_keep(rank, gamma)
    if previous is None or keep >= rank:
        return rank
    return keep if tail < previous else rank


def self_prune_rank(B: torch.Tensor, A: torch.Tensor, rank: int, *, gamma: float, previous: float | None) -> int:
    """HetLoRA's local rank self-pruning for one module: a client at rank r drops its last components, down to
    ⌊γ r⌋ (at least 1), when their contribution ‖B[:, ⌊γr⌋:r] A[⌊γr⌋:r]‖_F is smaller than the same norm a round
    before (`previous`; None on its first round: no pruning). Returns the new rank."""
    tail = tail_norm(B[:, :rank], A[:rank], prune_keep(rank, gamma))
    return prune_decision(rank, gamma=gamma, tail=tail, previous=previous)
