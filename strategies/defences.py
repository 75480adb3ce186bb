"""Defences against hostile clients: robust aggregation chosen by `strategy.defence`, and a cap on claimed weight.

A registered client can send any finite update and claim any example count; screening (`strategies.screening`)
only rejects malformed replies. A defence acts on the sound replies of a round, in the space the method
aggregates in (`LoraStrategy.update_space`, `strategies.robust_math`), before the method's own rule:

- ``norm_bound``: each client's update is shrunk to ‖u_k‖ ≤ `strategy.defence_bound` (a float, or ``median``: the
  median of this round's update norms) — Sun et al., "Can You Really Backdoor Federated Learning?", 2019,
  https://arxiv.org/abs/1911.07963. Under client-level DP the bound is the DP clip (`strategies.client_dp` clips).
- ``trimmed_mean`` / ``median``: coordinate-wise, cutting `strategy.trim_fraction` at each end, or the median —
  Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018,
  https://arxiv.org/abs/1803.01498. They give one robust state, which the method's rule then takes alone.
- ``krum`` / ``multikrum``: keep the 1 (Krum) or `strategy.multikrum_m` (default n − f) updates with the lowest
  Krum score for `strategy.krum_f` = f hostile clients — Blanchard et al., NeurIPS 2017,
  https://proceedings.neurips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html; the
  method's rule aggregates the kept replies; the dropped ones count as `rejected`.

In the product space (FedIT, LoRA-FAIR, FedEx-LoRA) a coordinate-wise rule gives a robust target T = rule_k(B_k·A_k)
per module (a dense d_out × d_in matrix) and a robust Ā* = rule_k(A_k); the state handed to the method is
(Ā*, B* = argmin_B ‖T − B·Ā*‖), the target carried at rank r on the robust A (`defence_fit_residual` records
what that loses). Identical replies come out unchanged in both spaces.

Clients of different ranks (FLoRA, FlexLoRA, HetLoRA) send tensors of different shapes; their defences act in
`strategies.robust_mixed`'s spaces, in units of the server's scaling s_R: ``scaled_product`` (R/r_k·B_k·A_k per
module; a coordinate rule's target is handed on as its truncated SVD at rank R, `defence_fit_residual` again) and
``padded`` (HetLoRA's zero-padded r_max factors). Every rule is defined there; Krum keeps replies as sent.

`strategy.max_examples_weight` caps the weight a claimed count buys: a number (at most that many examples),
``median`` (at most the round's median claim) or ``equal`` (every reply weighs 1). Each round's record says which
partitions were capped, clipped (with the factor), dropped or trimmed (`defence_*` fields of metrics.jsonl).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord

from fl.wire import from_record
from strategies import robust_math as rm
from strategies import robust_mixed as rmx
from strategies.screening import Reply
from strategies.stats import RoundStats

log = logging.getLogger(__name__)

MEDIAN = "median"
EQUAL = "equal"


@dataclass
class Kept:
    """What a defence leaves for the method's rule."""

    replies: list[Reply]  # the replies that count as aggregated (their metrics are recorded)
    client_weights: list[float]  # their weights
    states: list[dict[str, torch.Tensor]]  # what the method aggregates: the replies' (clipped) states, or one state
    weights: list[float]


def _update(state: rm.State, ref: rm.State | None, space: str, rank: int) -> dict[str, torch.Tensor]:
    """A reply's update in `space` (no reference: against zero); `rank` is R in the mixed-rank spaces."""
    if space in rmx.SPACES:
        return rmx.update(state, ref, space=space, rank=rank)
    return rm.update_vector(state, ref or {k: torch.zeros_like(v) for k, v in state.items()}, space=space)


def _reference(reference: ArrayRecord | None) -> dict[str, torch.Tensor] | None:
    return from_record(reference) if reference is not None else None


def _server_rank(replies: Sequence[Reply], ref: rm.State | None, space: str) -> int:
    """R for the mixed-rank spaces (the reference's rank); 0, unused, in the others."""
    return rmx.server_rank([r.state for r in replies], ref) if space in rmx.SPACES else 0


def keep_all(replies: list[Reply], weights: list[float], states: list[dict[str, torch.Tensor]] | None = None) -> Kept:
    return Kept(replies, weights, [r.state for r in replies] if states is None else states, weights)


class Defence:
    """A robust aggregation rule (`strategy.defence`); `none` is this base class."""

    name: ClassVar[str] = "none"

    def __init__(self) -> None:
        self.external_clip = False  # set by the client-level DP wrapper: its clip is the norm bound

    def apply(
        self,
        replies: list[Reply],
        weights: list[float],
        *,
        reference: ArrayRecord | None,
        space: str,
        stats: RoundStats,
    ) -> Kept:
        """The replies and states the method's rule aggregates this round."""
        return keep_all(replies, weights)

    def describe(self) -> str:
        """One line for the strategy's summary."""
        return self.name

    def state_dict(self) -> dict[str, Any]:
        """State kept across rounds (checkpointed)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""


class NormBound(Defence):
    """Shrink each update to ‖u_k‖ ≤ bound; `bound=None`: the median of the round's norms."""

    name: ClassVar[str] = "norm_bound"

    def __init__(self, bound: float | None) -> None:
        super().__init__()
        self.bound = bound
        self.history: list[float] = []  # the bound of every round so far (a running record; checkpointed)

    def apply(
        self,
        replies: list[Reply],
        weights: list[float],
        *,
        reference: ArrayRecord | None,
        space: str,
        stats: RoundStats,
    ) -> Kept:
        if self.external_clip or reference is None:
            return keep_all(replies, weights)
        ref = from_record(reference)
        rank = _server_rank(replies, ref, space)
        norms = [rm.norm(_update(r.state, ref, space, rank)) for r in replies]
        bound = float(np.median(norms)) if self.bound is None else self.bound
        self.history.append(bound)
        states = []
        for r in replies:
            if space in rmx.SPACES:
                clipped, scale, full = rmx.clip(r.state, ref, bound=bound, space=space, rank=rank)
            else:
                scale, full = rm.clip_scale(r.state, ref, bound=bound, space=space)
                clipped = rm.shrink(r.state, ref, scale)
            states.append(r.state if scale == 1.0 else clipped)
            stats.defence.setdefault("defence_norms", {})[r.partition] = full
            if scale < 1.0:
                record_clip(stats, r.partition, scale)
        stats.defence["defence_bound"] = bound
        return keep_all(replies, weights, states)

    def describe(self) -> str:
        return f"norm_bound (bound {'median of the round' if self.bound is None else self.bound})"

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state.get("history", []))


def record_clip(stats: RoundStats, partition: int, scale: float) -> None:
    """Note that `partition`'s update was shrunk by `scale` this round (also used by the client-level DP clip)."""
    stats.defence.setdefault("defence_clipped", {})[partition] = scale


class CoordinateRule(Defence):
    """A coordinate-wise rule: one robust state replaces the round's replies in the method's rule."""

    def rule(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def apply(
        self,
        replies: list[Reply],
        weights: list[float],
        *,
        reference: ArrayRecord | None,
        space: str,
        stats: RoundStats,
    ) -> Kept:
        states = [r.state for r in replies]
        if space in rmx.SPACES:
            ref = _reference(reference)
            robust, residual = rmx.robust_state(
                states, space=space, rank=_server_rank(replies, ref, space), rule=self.rule
            )
            if residual is not None:
                stats.defence["defence_fit_residual"] = residual
            return Kept(replies, weights, [robust], [1.0])
        pairs = rm.lora_pairs(states[0]) if space == "product" else {}
        paired = {k for pair in pairs.values() for k in pair}
        robust = {k: self.rule([s[k] for s in states]).to(v.dtype) for k, v in states[0].items() if k not in paired}
        num = den = 0.0
        for a_key, b_key in pairs.values():
            target = self.rule([s[b_key].double() @ s[a_key].double() for s in states])
            a = self.rule([s[a_key] for s in states])
            b = rm.fit_b(target, a)
            num, den = num + float(((target - b @ a) ** 2).sum()), den + float((target**2).sum())
            robust[a_key], robust[b_key] = a.to(states[0][a_key].dtype), b.to(states[0][b_key].dtype)
        if pairs:
            stats.defence["defence_fit_residual"] = (num / den) ** 0.5 if den > 0 else 0.0
        return Kept(replies, weights, [robust], [1.0])


class Median(CoordinateRule):
    """The coordinate-wise median (Yin et al., 2018)."""

    name: ClassVar[str] = "median"

    def rule(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return rm.coordinate_median(tensors)


class TrimmedMean(CoordinateRule):
    """The coordinate-wise mean after cutting `cut`·n values at each end (Yin et al., 2018)."""

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, cut: float) -> None:
        super().__init__()
        self.cut = cut

    def rule(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return rm.trimmed_mean(tensors, self.cut)

    def apply(
        self,
        replies: list[Reply],
        weights: list[float],
        *,
        reference: ArrayRecord | None,
        space: str,
        stats: RoundStats,
    ) -> Kept:
        coords: list[Mapping[str, torch.Tensor]] = [r.state for r in replies]  # the factors as sent: a cheap record
        if space in rmx.SPACES:  # shapes differ by rank: the points of the mixed-rank space
            ref = _reference(reference)
            rank = _server_rank(replies, ref, space)
            coords = [rmx.point(r.state, space=space, rank=rank) for r in replies]
        cut, total = np.zeros(len(replies)), 0
        for key in coords[0]:  # per client, how much of it was cut
            cut += rm.trimmed_share([c[key] for c in coords], self.cut)
            total += coords[0][key].numel()
        stats.defence["defence_trimmed"] = {r.partition: float(c / total) for r, c in zip(replies, cut, strict=True)}
        return super().apply(replies, weights, reference=reference, space=space, stats=stats)

    def describe(self) -> str:
        return f"trimmed_mean (cut {self.cut} at each end)"


class MultiKrum(Defence):
    """Keep the `m` updates with the lowest Krum score for `f` hostile clients (m=None: n − f)."""

    name: ClassVar[str] = "multikrum"

    def __init__(self, f: int, m: int | None) -> None:
        super().__init__()
        self.f, self.m = f, m

    def keep(self, n: int) -> int:
        return max(1, min(n, n - self.f if self.m is None else self.m))

    def apply(
        self,
        replies: list[Reply],
        weights: list[float],
        *,
        reference: ArrayRecord | None,
        space: str,
        stats: RoundStats,
    ) -> Kept:
        n = len(replies)
        if n <= 2 * self.f + 2:
            log.warning(
                "%s: %d replies <= 2f + 2 = %d (strategy.krum_f=%d): its guarantee needs more",
                self.name,
                n,
                2 * self.f + 2,
                self.f,
            )
        ref = _reference(reference)
        rank = _server_rank(replies, ref, space)
        scores = rm.krum_scores([_update(r.state, ref, space, rank) for r in replies], self.f)
        chosen = sorted(int(i) for i in np.argsort(scores, kind="stable")[: self.keep(n)])
        dropped = [replies[i].partition for i in range(n) if i not in chosen]
        stats.rejected += len(dropped)
        stats.defence["defence_scores"] = {r.partition: float(s) for r, s in zip(replies, scores, strict=True)}
        stats.defence["defence_dropped"] = dropped
        if dropped:
            log.info(
                "%s dropped partitions %s (scores %s)",
                self.name,
                dropped,
                [float(scores[i]) for i in range(n) if i not in chosen],
            )
        return keep_all([replies[i] for i in chosen], [weights[i] for i in chosen])

    def describe(self) -> str:
        return f"{self.name} (f={self.f}, keep {'n - f' if self.m is None else self.m})"


class Krum(MultiKrum):
    """Keep the one update with the lowest Krum score."""

    name: ClassVar[str] = "krum"

    def __init__(self, f: int) -> None:
        super().__init__(f, 1)
