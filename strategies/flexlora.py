"""FlexLoRA: clients of different ranks; the server averages their full updates and hands each client the truncated
SVD of the result at its own rank.

Bai, Chen, Qian, Yao, Li, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024, https://arxiv.org/abs/2402.11505 (FederatedScope's FlexLoRA branch).

Update rule, per adapted module, with p_k = n_k / Σ_j n_j and s_k = alpha / r_k:
ΔW = Σ_k p_k s_k B_k A_k (dense, on the server only); client k then starts its next round from the best
rank-r_k approximation of ΔW (Eckart–Young): B = U_r Σ_r^{1/2} / s_k, A = Σ_r^{1/2} V_rᵀ. The server's own
adapter (evaluation, export) is the same truncation at strategy.rank. Each client's bytes are its own rank's
factors both ways; the server pays one SVD per module and client rank each round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict

from fl import constants as K
from fl.adapters import A_SUFFIX, B_SUFFIX
from fl.wire import from_record, to_record
from strategies.hetero import HeteroLoRA, modules
from strategies.hetero_math import truncated_factors, weighted_product

DELTA_KEY = "::delta_w"
"""The name suffix of a module's ΔW in FlexLoRA's `optimizer_view` (never a tensor name of the model)."""


class FlexLoRA(HeteroLoRA):
    """FlexLoRA (https://arxiv.org/abs/2402.11505): average s_k·B_k·A_k, truncated SVD to each client's rank."""

    title: ClassVar[str] = "FlexLoRA"
    average_problem: ClassVar[str | None] = (
        "its model is the server's ΔW truncated at each rank, not the global arrays; their mean is not implemented"
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delta: dict[str, torch.Tensor] = {}  # module prefix -> this round's ΔW (float64, server only)
        self._down: dict[int, ArrayRecord] = {}  # rank -> the record clients of that rank get this round

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """ΔW per module, and the server's factors: its truncation at strategy.rank."""
        agg = self.others(states, weights)
        for prefix, (As, Bs, s) in self.updates(states, weights).items():
            self.delta[prefix] = weighted_product(As, Bs, weights, s)
            B, A = truncated_factors(self.delta[prefix], self.rank, scaling=self.scaling(self.rank))
            agg[prefix + A_SUFFIX], agg[prefix + B_SUFFIX] = A, B
        self._down = {}
        return agg

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """The truncated SVD of ΔW at the node's rank (before round 1: the server's initial factors, cut to it)."""
        rank = self.node_rank(node_id)
        if rank == self.rank:
            return super().arrays_for(node_id, arrays)
        if rank not in self._down:
            state = from_record(arrays)
            for prefix in [n[: -len(A_SUFFIX)] for n in state if n.endswith(A_SUFFIX)]:
                if prefix in self.delta:
                    B, A = truncated_factors(self.delta[prefix], rank, scaling=self.scaling(rank))
                else:  # PEFT's init (A random, B zero) at the lower rank
                    B, A = state[prefix + B_SUFFIX][:, :rank], state[prefix + A_SUFFIX][:rank]
                state[prefix + A_SUFFIX], state[prefix + B_SUFFIX] = A.contiguous(), B.contiguous()
            self._down[rank] = to_record(state)
        return RecordDict({K.ARRAYS: self._down[rank]})

    def optimizer_view(self, arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A server optimizer (`server_opt=`) steps FlexLoRA's full-rank state: ΔW per module (and the head), not
        its rank-R truncation, since every client's factors are cut from ΔW. Before round 1 ΔW = s·B·A of the
        initial factors (zero: PEFT's B starts at zero)."""
        view = {k: v for k, v in arrays.items() if not k.endswith((A_SUFFIX, B_SUFFIX))}
        s = self.scaling(self.rank)
        for prefix in modules(arrays):
            dw = self.delta.get(prefix)
            view[prefix + DELTA_KEY] = (
                dw if dw is not None else s * arrays[prefix + B_SUFFIX].double() @ arrays[prefix + A_SUFFIX].double()
            )
        return view

    def with_optimizer_view(
        self, arrays: Mapping[str, torch.Tensor], view: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The stepped ΔW becomes the state clients' truncations are cut from; the server's factors its rank-R one."""
        out = dict(arrays)
        for key, value in view.items():
            if not key.endswith(DELTA_KEY):
                out[key] = value
                continue
            prefix = key[: -len(DELTA_KEY)]
            self.delta[prefix] = value
            B, A = truncated_factors(value, self.rank, scaling=self.scaling(self.rank))
            out[prefix + A_SUFFIX], out[prefix + B_SUFFIX] = (
                A.to(arrays[prefix + A_SUFFIX].dtype),
                B.to(arrays[prefix + B_SUFFIX].dtype),
            )
        self._down = {}
        return out

    def state_dict(self) -> dict[str, Any]:
        """The base state plus ΔW (a resumed run hands clients the same truncations)."""
        return {**super().state_dict(), "delta": dict(self.delta)}

    def load_state_dict(self, state: Any) -> None:
        """Restore `state_dict()`."""
        super().load_state_dict(state)
        self.delta, self._down = dict(state.get("delta", {})), {}
