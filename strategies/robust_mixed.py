"""Robust aggregation when clients train at different ranks (FLoRA, FlexLoRA, HetLoRA): the spaces in which their
updates are comparable, and the defences' maths there (`strategies.defences` applies it; tests/test_defences_mixed.py).

Client k of rank r_k has PEFT's LoRA scaling s_k = alpha / r_k; the server's adapter (the defence's reference,
the global arrays) has rank R = strategy.rank ≥ every r_k and scaling s_R. Replies of different ranks have
tensors of different shapes, so `robust_math`'s coordinate-wise rules cannot stack them. Everything here is in
units of s_R: a client's B_k (or B_k·A_k) is multiplied by s_k / s_R = R / r_k, so alpha drops out, and with one
rank everywhere the two spaces are `robust_math`'s ``factors`` and ``product`` exactly (same vectors, same norms,
so `strategy.defence_bound` means the same for FedIT and FlexLoRA at one rank).

- ``padded`` (HetLoRA, which averages in it): client k's point is (pad_R(R/r_k·B_k), pad_R(A_k)) per module,
  zero columns of B and zero rows of A up to R (`hetero_math.zero_pad`), and its head as sent. The space is
  linear in the factors, as ``factors`` is: a coordinate rule's result is a state at rank R; a clipped reply is
  reference + c·(point − reference) with c = bound / ‖u‖, also at rank R.
- ``scaled_product`` (FLoRA, FlexLoRA: their rules read only the products s_k·B_k·A_k): client k's point per
  module is P_k = R/r_k·B_k·A_k = ΔW_k / s_R (d_out × d_in for every rank), its head as sent; the reference's is
  B_ref·A_ref. A coordinate rule gives a target T per module; the state handed on is T's best rank-R factors
  (truncated SVD, Eckart–Young: `hetero_math.truncated_factors`), and ‖T − trunc_R(T)‖ / ‖T‖ over modules is the
  round's `defence_fit_residual`. A clipped reply's product P_ref + c·(P_k − P_ref) is carried exactly by factors
  of rank r' = r_k + R: B' = r'/R·[c·R/r_k·B_k, (1 − c)·B_ref], A' = [A_k; A_ref] (rank r_k, B' = c·B_k, when the
  reference's product is zero, as FLoRA's fresh adapter is).

An honest client of rank r_k < R starts its round from the first r_k components of the global adapter (HetLoRA) or
its rank-r_k truncation (FlexLoRA), so its update measured against the rank-R reference includes the reference's
tail it never had: low-rank clients look further away than their training moved them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.hetero_math import truncated_factors, zero_pad
from strategies.lora_math import combine_residuals
from strategies.robust_math import Rule, lora_pairs, norm

State = Mapping[str, torch.Tensor]
SPACES = ("padded", "scaled_product")
"""The mixed-rank update spaces (`LoraStrategy.update_space`)."""


def rank_of(state: State) -> int:
    """The LoRA rank of `state` (rows of its first A; 0 when it has no LoRA pair)."""
    pairs = lora_pairs(state)
    return int(state[next(iter(pairs.values()))[0]].shape[0]) if pairs else 0


def server_rank(states: Sequence[State], reference: State | None) -> int:
    """R: the reference's rank, or without one the largest rank among `states`."""
    return rank_of(reference) if reference is not None else max(rank_of(s) for s in states)


def point(state: State, *, space: str, rank: int) -> dict[str, torch.Tensor]:
    """`state`'s coordinates in `space` at server rank `rank` (float64, in units of s_R; see the module docstring):
    padded factors under the state's own keys, or one product per module prefix; other tensors as they are."""
    if space not in SPACES:
        raise ValueError(f"update space {space!r} is not a mixed-rank space; use one of {SPACES}.")
    pairs = lora_pairs(state)
    paired = {k for pair in pairs.values() for k in pair}
    out = {k: v.double() for k, v in state.items() if k not in paired}
    for prefix, (a_key, b_key) in pairs.items():
        a, b = state[a_key].double(), state[b_key].double() * (rank / state[a_key].shape[0])
        if space == "padded":
            out[b_key], out[a_key] = zero_pad(b, a, rank)
        else:
            out[prefix] = b @ a
    return out


def update(state: State, reference: State | None, *, space: str, rank: int) -> dict[str, torch.Tensor]:
    """A client's update in `space`: its point minus the reference's (no reference: its point)."""
    own = point(state, space=space, rank=rank)
    if reference is None:
        return own
    ref = point(reference, space=space, rank=rank)
    return {k: v - ref[k] for k, v in own.items()}


def clip(
    state: State, reference: State, *, bound: float, space: str, rank: int
) -> tuple[dict[str, torch.Tensor], float, float]:
    """(state', c, ‖u‖): a state whose update in `space` is c·u with c = min(1, bound / ‖u‖) — `state` itself
    when c = 1, else at rank R (padded) or r_k + R (scaled_product; r_k when the reference's product is zero)."""
    full = norm(update(state, reference, space=space, rank=rank))
    if full <= bound:
        return dict(state), 1.0, full
    c = bound / full
    dtype = next(iter(state.values())).dtype
    pairs = lora_pairs(state)
    paired = {k for pair in pairs.values() for k in pair}
    ref_point = point(reference, space=space, rank=rank) if space == "padded" else {}
    own = point(state, space=space, rank=rank) if space == "padded" else {}
    out = {}
    for k, v in state.items():
        if space == "padded" or k not in paired:  # linear in the coordinates: reference + c·(point − reference)
            base, x = (ref_point[k], own[k]) if k in paired else (reference[k].double(), v.double())
            out[k] = (base + c * (x - base)).to(dtype)
    if space == "scaled_product":
        for a_key, b_key in pairs.values():
            out[a_key], out[b_key] = _shrunk_product(state, reference, a_key, b_key, c=c, rank=rank)
    return out, c, full


def _shrunk_product(
    state: State, reference: State, a_key: str, b_key: str, *, c: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with R/r'·B'·A' = c·R/r_k·B_k·A_k + (1 − c)·B_ref·A_ref, r' = rank of A' (see the docstring)."""
    a, b = state[a_key].double(), state[b_key].double()
    a_ref, b_ref = reference[a_key].double(), reference[b_key].double()
    if not (bool(a_ref.any()) and bool(b_ref.any())):  # the reference's product is zero: scale B_k alone
        return state[a_key], (c * b).to(state[b_key].dtype)
    r_k = a.shape[0]
    wide = r_k + a_ref.shape[0]
    new_b = wide / rank * torch.cat([c * rank / r_k * b, (1 - c) * b_ref], dim=1)
    return torch.cat([a, a_ref], dim=0).to(state[a_key].dtype), new_b.to(state[b_key].dtype)


def robust_state(
    states: Sequence[State], *, space: str, rank: int, rule: Rule
) -> tuple[dict[str, torch.Tensor], float | None]:
    """(state, residual): `rule` applied coordinate-wise to the clients' points, as one state at rank R.

    Padded: the robust point is the state (residual None). Scaled product: per module the robust target T is
    carried by its truncated SVD at rank R (scaling 1: the state's R/R·B·A = trunc_R(T); zero-padded to R where a
    module is narrower than R); the residual is
    ‖T − trunc_R(T)‖ / ‖T‖ over modules (0 when every T has rank ≤ R). Rules are shift-equivariant (median, trimmed
    mean), so the reference drops out."""
    points = [point(s, space=space, rank=rank) for s in states]
    dtype = next(iter(states[0].values())).dtype
    robust = {k: rule([p[k] for p in points]) for k in points[0]}
    if space == "padded":
        return {k: v.to(dtype) for k, v in robust.items()}, None
    pairs = lora_pairs(states[0])
    out = {k: v.to(dtype) for k, v in robust.items() if k not in pairs}
    parts = []
    for prefix, (a_key, b_key) in pairs.items():
        target = robust[prefix]
        b, a = zero_pad(*truncated_factors(target, min(rank, *target.shape)), rank)
        parts.append((float(((target - b.double() @ a.double()) ** 2).sum()), float((target**2).sum())))
        out[a_key], out[b_key] = a.to(dtype), b.to(dtype)
    return out, combine_residuals(parts)
