"""LoRA-FAIR: a server-side correction of the averaged B so that B̄'·Ā matches the ideal update.

Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement",
ICCV 2025, https://arxiv.org/abs/2411.14961

Per adapted module the server forms Ā = Σ p_k A_k, B̄ = Σ p_k B_k and the ideal ΔW = Σ p_k B_k·A_k, then

    ΔB* = argmin_ΔB  S(ΔW, (B̄ + ΔB)·Ā) + λ‖ΔB‖²,   S = 1 − cos(flattened matrices),

by gradient descent from ΔB = 0 (`solver=sgd`, the paper's), or the ridge least-squares variant
min ‖ΔW − (B̄ + ΔB)Ā‖² + λ‖ΔB‖² in closed form (`solver=closed_form`, an r × r solve). It broadcasts
Ā and B̄' = B̄ + ΔB*; clients start the next round from them. No extra bytes travel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar

import torch

from fl.adapters import A_SUFFIX, B_SUFFIX
from strategies.base import LoraStrategy, RoundStats
from strategies.lora_math import (
    combine_residuals,
    fair_correction_closed_form,
    fair_correction_sgd,
    ideal_update,
    relative_residual,
    weighted_average,
)

Solver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LoraFAIR(LoraStrategy):
    """LoRA-FAIR (https://arxiv.org/abs/2411.14961): FedIT averaging plus a corrected B̄'."""

    adapter_kind: ClassVar[str] = "lora"
    client_dp_problem: ClassVar[str | None] = (
        "its correction reads every client's B_k·A_k, which client-level DP leaves un-noised (only the mean "
        "is), so the corrected B̄' is not post-processing of the private release"
    )
    SOLVERS: ClassVar[tuple[str, ...]] = ("sgd", "closed_form")

    def solver(self) -> Solver:
        """The configured solver as (ΔW, Ā, B̄) -> B̄'."""
        s = self.cfg.strategy
        if s.solver == "sgd":
            return lambda dw, a, b: fair_correction_sgd(
                dw, a, b, lam=float(s.lam), lr=float(s.solver_lr), steps=int(s.steps)
            )
        if s.solver == "closed_form":
            return lambda dw, a, b: fair_correction_closed_form(dw, a, b, lam=float(s.lam))
        raise ValueError(f"strategy.solver={s.solver!r} is unknown; use one of {self.SOLVERS}.")

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """FedIT's averages, then B̄ -> B̄' per module; records residual before/after and solve time."""
        agg = weighted_average(states, weights)
        solve = self.solver()
        before, after, seconds = [], [], 0.0
        for name in [k for k in agg if k.endswith(A_SUFFIX)]:
            b_name = name[: -len(A_SUFFIX)] + B_SUFFIX
            dw = ideal_update([s[name] for s in states], [s[b_name] for s in states], weights)
            a_bar, b_bar = agg[name], agg[b_name]
            before.append(relative_residual(dw, b_bar, a_bar))
            t0 = time.perf_counter()
            agg[b_name] = solve(dw, a_bar, b_bar).to(b_bar.dtype)
            seconds += time.perf_counter() - t0
            after.append(relative_residual(dw, agg[b_name], a_bar))
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.extra["residual_before"] = combine_residuals(before)
        stats.extra["residual_after"] = combine_residuals(after)
        stats.extra["solve_seconds"] = seconds
        return agg
