"""FedEx-LoRA: FedIT's averages plus the aggregation residual folded into the frozen base weights.

Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025, https://arxiv.org/abs/2410.09432 (`aggregate_models_fedex` in the Fed-SB
authors' code).

Update rule, per adapted module, with p_k = n_k / Σ_j n_j and s the LoRA scaling (alpha / rank):
Ā = Σ_k p_k A_k, B̄ = Σ_k p_k B_k (FedIT), and the residual E = s·(Σ_k p_k B_k·A_k − B̄·Ā) is added to
the frozen W0. Then W0 + E + s·B̄·Ā = Σ_k p_k (W0 + s·B_k·A_k): the global model is exact (the round's
`residual`, after folding, is float error; `residual_before` is FedIT's gap). Clients start the next
round from Ā, B̄ on the new W0.

Cost: E is dense (d_out × d_in per module) and goes down to every client every round. The server keeps
the cumulative fold ΔW0 = Σ_rounds E and sends it whole under `base-delta` (same size as one round's E),
so a client that missed rounds, or a process reusing one model for many clients, lands on the same W0
(`fl.base_delta`). It is counted in `bytes_down`/`floats_down`; the uplink is FedIT's. Export writes the
LoRA adapter and ``adapter/base_delta.safetensors`` (ΔW0 by the plain model's parameter names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict

from fl import constants as K
from fl.adapters import A_SUFFIX, B_SUFFIX
from fl.base_delta import base_weight_name
from fl.wire import to_record
from strategies.base import LoraStrategy
from strategies.lora_math import (
    combine_residuals,
    fedex_fold_residual,
    fedex_residual,
    ideal_update,
    relative_residual,
    weighted_average,
)
from strategies.stats import RoundStats


class FedExLoRA(LoraStrategy):
    """FedEx-LoRA (https://arxiv.org/abs/2410.09432): FedIT plus the residual folded into W0 each round."""

    title: ClassVar[str] = "FedEx-LoRA"

    adapter_kind: ClassVar[str] = "lora"
    update_space: ClassVar[str] = "product"  # a defence acts on B_k·A_k − B̄·Ā (strategies.defences)
    client_dp_problem: ClassVar[str | None] = (
        "its residual E = Σ p_k B_k·A_k − B̄·Ā is built from every client's un-noised factors and sent to all "
        "clients (and exported) without noise"
    )
    server_opt_problem: ClassVar[str | None] = (
        "each round folds the exact residual E into the frozen W0 on every client, so the global model is "
        "W0 + ΣE + s·B̄·Ā; a step on Ā, B̄ alone would leave the folded part un-stepped and the product inexact "
        "again, and the fold lives in clients' W0, where no server moment can act"
    )
    average_problem: ClassVar[str | None] = (
        "part of each round's model is the residual folded into the clients' W0, which a mean of Ā, B̄ leaves out"
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fold: dict[str, torch.Tensor] = {}  # base weight name -> cumulative ΔW0 (float32)
        self._fold_record: ArrayRecord | None = None
        self._residual_after = float("nan")

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """FedIT's averages; E per module added to the cumulative fold."""
        agg = weighted_average(states, weights)
        scaling = self.alpha / self.rank
        before, after = [], []
        for name in [k for k in agg if k.endswith(A_SUFFIX)]:
            prefix = name[: -len(A_SUFFIX)]
            As, Bs = [s[name] for s in states], [s[prefix + B_SUFFIX] for s in states]
            a_bar, b_bar = agg[name], agg[prefix + B_SUFFIX]
            e = fedex_residual(As, Bs, weights, A_bar=a_bar, B_bar=b_bar, scaling=scaling)
            key = base_weight_name(prefix)
            self.fold[key] = self.fold[key] + e if key in self.fold else e
            before.append(relative_residual(ideal_update(As, Bs, weights), b_bar, a_bar))
            after.append(fedex_fold_residual(As, Bs, weights, A_bar=a_bar, B_bar=b_bar, E=e, scaling=scaling))
        self._fold_record = None
        self._residual_after = combine_residuals(after)
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.extra["residual_before"] = combine_residuals(before)
        stats.extra["fold_norm"] = float(sum(float((f.double() ** 2).sum()) for f in self.fold.values()) ** 0.5)
        return agg

    def residual(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], agg: Mapping[str, torch.Tensor]
    ) -> float:
        """The gap left after folding: ‖s·Σ p_k B_k A_k − (s·B̄Ā + E)‖ / ‖s·Σ p_k B_k A_k‖ (float error)."""
        return self._residual_after

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """The global adapter plus the cumulative ΔW0 (from round 2 on; nothing is folded before)."""
        content = super().arrays_for(node_id, arrays)
        if self.fold:
            if self._fold_record is None:
                self._fold_record = to_record(self.fold)
            content[K.BASE_DELTA] = self._fold_record
        return content

    def base_delta(self) -> dict[str, torch.Tensor]:
        """The cumulative ΔW0 per base weight name."""
        return dict(self.fold)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus the fold (a resumed run continues on the same W0)."""
        return {**super().state_dict(), "fold": dict(self.fold)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""
        super().load_state_dict(state)
        self.fold = dict(state.get("fold", {}))
        self._fold_record = None
