"""The hooks a federated LoRA method overrides, with the defaults FedIT uses (plain FedAvg over A and B).

A method subclasses `strategies.base.LoraStrategy` and overrides only what its update rule changes:
`aggregate_arrays` (the rule), `arrays_for` (what one client is sent), `prepare` (work before round 1, e.g.
Fed-SB's init), `materialize` (the tensors the server's model evaluates), `base_delta` (a change to the frozen
base weights, FedEx-LoRA's fold), `extra_config` (its own message entries), `expected_for` (a client's reply
shapes, heterogeneous ranks), `residual` (how far the aggregate is from the mean of the clients' products) and
`optimizer_view` / `with_optimizer_view` (the state a server optimizer steps, `strategies.server_opt`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid

from fl import constants as K
from fl.wire import from_record
from strategies.lora_math import aggregation_residual, weighted_average


class MethodHooks:
    """Default method hooks; `LoraStrategy` sets the two attributes they read."""

    fixed: dict[str, torch.Tensor]
    """Frozen adapter tensors the clients hold without being sent them each round (FFA's A, Fed-SB's A and B)."""
    expected: dict[str, tuple[int, ...]]
    """The global arrays' tensor names and shapes (what a reply must match)."""

    def prepare(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """Work before round 1; returns the initial global arrays. Default: nothing to do."""
        return arrays

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """The array records a node is sent this round. Default: the global arrays."""
        return RecordDict({K.ARRAYS: arrays})

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """The update rule. Default: example-weighted average of every tensor (FedAvg)."""
        return weighted_average(states, weights)

    def materialize(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """Every adapter tensor the server model needs to evaluate `arrays`."""
        return from_record(arrays)

    def base_delta(self) -> dict[str, torch.Tensor]:
        """The cumulative change to the frozen base weights, by parameter name (FedEx-LoRA). Default: none."""
        return {}

    def extra_config(self, server_round: int) -> dict[str, Any]:
        """Method-specific ConfigRecord entries for a training round."""
        return {}

    def expected_for(self, node: int) -> Mapping[str, tuple[int, ...]]:
        """The tensor names and shapes `node` must reply with. Default: the global arrays' (one rank for all)."""
        return self.expected

    def residual(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], agg: Mapping[str, torch.Tensor]
    ) -> float:
        """‖Σ p_k B_k A_k − B̄Ā‖ / ‖Σ p_k B_k A_k‖ over all adapted modules (0 = exact)."""
        return aggregation_residual(self.fixed, states, weights, agg)

    def optimizer_view(self, arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a server optimizer steps, read from global arrays (`server_opt=`). Default: all of them,
        exactly what the method averages and sends (FedIT: A, B, head; FFA-LoRA: B, head; Fed-SB: R, head)."""
        return dict(arrays)

    def with_optimizer_view(
        self, arrays: Mapping[str, torch.Tensor], view: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The global arrays after the server optimizer stepped `view` (the inverse of `optimizer_view`)."""
        return {**arrays, **view}
