"""Pure maths of robust aggregation on LoRA replies (`strategies.defences` applies it; tests/test_defences.py).

Two update spaces, the one each method aggregates in (`LoraStrategy.update_space`):

- ``factors`` (FFA-LoRA's B, Fed-SB's R, and every method's head): the trained tensors are the whole update in an
  exact linear space, so a client's update is u_k = state_k − global, and coordinate-wise rules act on the
  tensors themselves (a median of shifted values is the shifted median: the reference drops out).
- ``product`` (FedIT, LoRA-FAIR, FedEx-LoRA): a client's update of an adapted module is B_k·A_k − B̄·Ā (the
  previous global's product, formed on the server), its head tensors as above.

Coordinate-wise rules use Flower's own: `flwr.serverapp.strategy.fedtrimmedavg.trim_mean` for the trimmed mean;
np.median along the client axis is what Flower's `FedMedian.aggregate_train` computes (it has no function of its
own to reuse). Krum's distances are Flower's `multikrum.compute_distances`; its `select_multikrum` returns the
chosen records without their scores, which the round's record needs, so `krum_scores` scores them here with the
same rule (the sum of the n − f − 2 smallest squared distances to the others).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import compute_distances

from fl.adapters import A_SUFFIX, B_SUFFIX
from strategies.lora_math import combine_residuals

State = Mapping[str, torch.Tensor]
Rule = Callable[[Sequence[torch.Tensor]], torch.Tensor]
"""A coordinate-wise rule: the clients' tensors of one name -> one tensor (`coordinate_median`, `trimmed_mean`)."""
SPACES = ("factors", "product")


def lora_pairs(state: State) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key) for every LoRA pair in `state` (FedIT's A and B both travel)."""
    out = {}
    for key in state:
        if key.endswith(A_SUFFIX):
            prefix = key[: -len(A_SUFFIX)]
            if prefix + B_SUFFIX in state:
                out[prefix] = (key, prefix + B_SUFFIX)
    return out


def _paired(state: State) -> set[str]:
    return {k for pair in lora_pairs(state).values() for k in pair}


def update_vector(state: State, reference: State, *, space: str) -> dict[str, torch.Tensor]:
    """A client's update in `space` (float64): state − reference per tensor, or per LoRA pair B·A − B_ref·A_ref."""
    if space not in SPACES:
        raise ValueError(f"update space {space!r} is unknown; use one of {SPACES}.")
    pairs = lora_pairs(state) if space == "product" else {}
    paired = _paired(state) if pairs else set()
    out = {k: state[k].double() - reference[k].double() for k in state if k not in paired}
    for prefix, (a, b) in pairs.items():
        out[prefix] = state[b].double() @ state[a].double() - reference[b].double() @ reference[a].double()
    return out


def norm(update: Mapping[str, torch.Tensor]) -> float:
    """‖u‖₂ over every tensor of `update` as one vector."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in update.values()))


def shrink(state: State, reference: State, scale: float) -> dict[str, torch.Tensor]:
    """reference + scale·(state − reference) for every tensor (dtype kept)."""
    return {
        k: (reference[k].double() + scale * (v.double() - reference[k].double())).to(v.dtype) for k, v in state.items()
    }


def clip_scale(state: State, reference: State, *, bound: float, space: str, iters: int = 80) -> tuple[float, float]:
    """(c, ‖u‖): the factor c ∈ (0, 1] with which `shrink(state, reference, c)` has an update norm ≤ `bound`.

    In the factor space u(c) = c·u, so c = min(1, bound/‖u‖). In the product space each module's update of the
    shrunk factors is (B + cΔB)(A + cΔA) − BA = c·X + c²·Y with X = ΔB·A + B·ΔA and Y = ΔB·ΔA, so
    ‖u(c)‖² = c²(‖X‖² + ‖u_head‖²) + 2c³⟨X, Y⟩ + c⁴‖Y‖² — a quartic in c, solved for ‖u(c)‖ = bound by bisection
    on [0, 1] (‖u(0)‖ = 0 < bound < ‖u(1)‖). The client's reply stays a pair of factors; its product update is
    bounded exactly, not its factors.
    """
    full = norm(update_vector(state, reference, space=space))
    if full <= bound:
        return 1.0, full
    if space == "factors":
        return bound / full, full
    pairs = lora_pairs(state)
    c2 = c3 = c4 = 0.0
    for key in set(state) - _paired(state):
        c2 += float(((state[key].double() - reference[key].double()) ** 2).sum())
    for a_key, b_key in pairs.values():
        a, b = reference[a_key].double(), reference[b_key].double()
        da, db = state[a_key].double() - a, state[b_key].double() - b
        x, y = db @ a + b @ da, db @ da
        c2, c3, c4 = c2 + float((x**2).sum()), c3 + 2 * float((x * y).sum()), c4 + float((y**2).sum())
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if c2 * mid**2 + c3 * mid**3 + c4 * mid**4 > bound**2:
            hi = mid
        else:
            lo = mid
    return lo, full


def clip(state: State, reference: State, *, bound: float, space: str) -> tuple[dict[str, torch.Tensor], float, float]:
    """(state', c, ‖u‖): `state` shrunk towards `reference` by `clip_scale`'s c (a copy of `state` when c = 1)."""
    scale, full = clip_scale(state, reference, bound=bound, space=space)
    return (dict(state) if scale == 1.0 else shrink(state, reference, scale)), scale, full


def robust_state(states: Sequence[State], *, space: str, rule: Rule) -> tuple[dict[str, torch.Tensor], float | None]:
    """(state, residual): `rule` applied coordinate-wise over the clients, as one state of the replies' shapes.

    Factors: every tensor by itself (residual None). Product: per LoRA pair the robust target T = rule_k(B_k·A_k)
    and Ā* = rule_k(A_k), carried as (Ā*, B* = `fit_b`(T, Ā*)); the residual is ‖T − B*·Ā*‖ / ‖T‖ over modules
    (None when the state has no pair). Other tensors (the head) as in the factor space."""
    pairs = lora_pairs(states[0]) if space == "product" else {}
    paired = _paired(states[0]) if pairs else set()
    robust = {k: rule([s[k] for s in states]).to(v.dtype) for k, v in states[0].items() if k not in paired}
    parts = []
    for a_key, b_key in pairs.values():
        target = rule([s[b_key].double() @ s[a_key].double() for s in states])
        a = rule([s[a_key] for s in states])
        b = fit_b(target, a)
        parts.append((float(((target - b @ a) ** 2).sum()), float((target**2).sum())))
        robust[a_key], robust[b_key] = a.to(states[0][a_key].dtype), b.to(states[0][b_key].dtype)
    return robust, combine_residuals(parts) if pairs else None


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median over clients (np.median: the mean of the two middle values for an even count)."""
    stack = np.stack([t.double().numpy() for t in tensors])
    return torch.from_numpy(np.median(stack, axis=0))


def trimmed_mean(tensors: Sequence[torch.Tensor], cut: float) -> torch.Tensor:
    """The coordinate-wise mean after cutting int(cut·n) values at each end (Flower's `trim_mean`)."""
    return torch.from_numpy(np.asarray(trim_mean(np.stack([t.double().numpy() for t in tensors]), cut)))


def trimmed_share(tensors: Sequence[torch.Tensor], cut: float) -> np.ndarray:
    """Per client, how many of its coordinates the trimmed mean cut (a count per client; stable ranks on ties)."""
    stack = np.stack([t.double().numpy().ravel() for t in tensors])
    n = stack.shape[0]
    low = int(cut * n)
    if low == 0:
        return np.zeros(n)
    ranks = np.argsort(np.argsort(stack, axis=0, kind="stable"), axis=0, kind="stable")
    return ((ranks < low) | (ranks >= n - low)).sum(axis=1).astype(float)


def fit_b(target: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """argmin_B ‖target − B·a‖_F (least squares, float64): the B that carries a robust product target on `a`."""
    return torch.linalg.lstsq(a.double().T, target.double().T).solution.T


def krum_scores(updates: Sequence[Mapping[str, torch.Tensor]], f: int) -> np.ndarray:
    """Krum's score per client (Blanchard et al., NeurIPS 2017): the sum of its n − f − 2 smallest squared
    distances to the other updates (at least one), with Flower's `compute_distances`."""
    records = [ArrayRecord([t.float().numpy() for _, t in sorted(u.items())]) for u in updates]
    dist = compute_distances(records)
    n = len(records)
    closest = max(1, n - f - 2)
    return np.array([np.sort(np.delete(dist[i], i))[:closest].sum() for i in range(n)])
