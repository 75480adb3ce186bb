"""Coordinate-wise rules (median, trimmed mean): one robust state replaces the round's replies in the method's rule.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018, https://arxiv.org/abs/1803.01498. In the product space the rule gives a robust target
T = rule_k(B_k·A_k) per module and a robust Ā* = rule_k(A_k); the state handed on is (Ā*, B* = argmin_B
‖T − B·Ā*‖), and `defence_fit_residual` records what carrying T at rank r on Ā* loses; with mixed ranks, T's
truncated SVD at the server's rank (`strategies.robust_mixed`). Identical replies come out unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from strategies.defences.base import Defence, Kept, UpdateSpace
from strategies.screening import Reply
from strategies.stats import RoundStats


class CoordinateRule(Defence):
    """A coordinate-wise rule (`rule`) over the clients, as one state the method's rule then takes alone."""

    client_dp_problem: ClassVar[str | None] = (
        "a coordinate-wise median or trimmed mean moves by more than C/m when one client changes"
    )

    def rule(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The clients' tensors of one name -> the robust tensor."""
        raise NotImplementedError

    def defend(self, replies: list[Reply], weights: list[float], space: UpdateSpace, stats: RoundStats) -> Kept:
        robust, residual = space.robust_state([r.state for r in replies], self.rule)
        if residual is not None:
            stats.defence["defence_fit_residual"] = residual
        return Kept(replies, weights, [robust], [1.0])
