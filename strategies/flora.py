"""FLoRA: clients of different ranks; the server stacks their factors, which is exact, and every client folds the
stacked product into its frozen base and starts a fresh LoRA at its own rank.

Wang, Shen, Yin, Fang, Wang, Huang, Li, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024, https://arxiv.org/abs/2409.05976 (code: ATP-1010/FederatedLLM).

Update rule, per adapted module, with p_k = n_k / Σ_j n_j and s_k = alpha / r_k:
B = [p_1 s_1 B_1 … p_K s_K B_K] (d_out × Σ r_k), A = [A_1; …; A_K] (Σ r_k × d_in), so B·A = Σ_k p_k s_k B_k A_k
with no cross terms (the round's `residual` is float error). Every client adds B·A to its W0 and trains a fresh
LoRA (A random, B zero) at its own rank next round; the head is example-weighted.

What goes down: the stacked factors (counted in `bytes_down`, growing with Σ r_k), plus the client's fresh A_k.
A client is sent the stacks of every round so far (`base-delta-factors`), so one that missed rounds, or a process
serving many virtual clients with one model, still lands on the global W0 (the paper sends only the latest
round's, to clients that keep their W0): the downlink grows with the rounds too. A party that keeps its fold between
messages (`fl.base_delta.fold_factors`) multiplies out only the stacks it has not folded (the new round's) and lands
on this server's fold exactly: the same float64 products, summed in float32 in round order. The server evaluates
and exports W0 + Σ_t B_t·A_t with a zero LoRA: `adapter/` (r = strategy.rank, B = 0) and
`adapter/base_delta.safetensors`, as FedEx-LoRA's export (`fl.base_delta.apply_to_base`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict

from fl import constants as K
from fl.adapters import A_SUFFIX, B_SUFFIX
from fl.base_delta import base_weight_name, factored
from fl.checks import derive_seed
from fl.wire import from_record, to_record
from strategies.hetero import HeteroLoRA
from strategies.hetero_math import flora_stack, weighted_product
from strategies.lora_math import combine_residuals


def fresh_a(rank: int, d_in: int, *, seed: int) -> torch.Tensor:
    """A new LoRA A (rank × d_in) as PEFT draws it (Kaiming-uniform, a = √5), from `seed`."""
    a = torch.empty(rank, d_in)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return a


class FLoRA(HeteroLoRA):
    """FLoRA (https://arxiv.org/abs/2409.05976): stack the clients' factors, fold B·A into W0, restart LoRA."""

    title: ClassVar[str] = "FLoRA"
    server_opt_problem: ClassVar[str | None] = (
        "each round's exact stack is folded into the clients' frozen W0 and every client restarts a fresh LoRA, "
        "so no global adapter persists between rounds for a server optimizer to step"
    )
    average_problem: ClassVar[str | None] = "the model lives in the clients' folded W0, not in global arrays to average"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stacks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # round -> W0 name -> (B, A)
        self.fold: dict[str, torch.Tensor] = {}  # W0 name -> Σ_t B_t A_t (float32)
        self._stack_record: ArrayRecord | None = None
        self._residual = float("nan")
        self._round = 0

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """Stack per module; the next global LoRA is fresh (A new, B zero) and the head is averaged."""
        agg = self.others(states, weights)
        stacks, parts = {}, []
        for prefix, (As, Bs, s) in self.updates(states, weights).items():
            B, A = flora_stack(As, Bs, weights, s)
            name = base_weight_name(prefix)
            stacks[name] = (B, A)
            prod = B.double() @ A.double()
            self.fold[name] = self.fold[name] + prod.float() if name in self.fold else prod.float()
            dw = weighted_product(As, Bs, weights, s)
            parts.append((float(((dw - prod) ** 2).sum()), float((dw**2).sum())))
            d_in, d_out = As[0].shape[1], Bs[0].shape[0]
            agg[prefix + A_SUFFIX] = fresh_a(self.rank, d_in, seed=self._seed(server_round, self.rank))
            agg[prefix + B_SUFFIX] = torch.zeros(d_out, self.rank)
        self.stacks[server_round] = stacks
        self._stack_record = None
        self._residual = combine_residuals(parts)
        self._round = server_round
        return agg

    def _seed(self, server_round: int, rank: int) -> int:
        return derive_seed(self.seed, server_round=server_round, index=rank * 101)

    def residual(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], agg: Mapping[str, torch.Tensor]
    ) -> float:
        """‖Σ p_k s_k B_k A_k − B·A‖ / ‖Σ p_k s_k B_k A_k‖ of the stacks (float error: stacking is exact)."""
        return self._residual

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """A fresh LoRA at the node's rank (the round's A, cut to it, B zero) and the stacks so far."""
        rank = self.node_rank(node_id)
        if rank == self.rank:
            content = super().arrays_for(node_id, arrays)
        else:
            state = from_record(arrays)
            for prefix in [n[: -len(A_SUFFIX)] for n in state if n.endswith(A_SUFFIX)]:
                state[prefix + A_SUFFIX] = state[prefix + A_SUFFIX][:rank].contiguous()
                state[prefix + B_SUFFIX] = state[prefix + B_SUFFIX][:, :rank].contiguous()
            content = RecordDict({K.ARRAYS: to_record(state)})
        if self.stacks:
            if self._stack_record is None:
                self._stack_record = to_record(factored({str(t): s for t, s in sorted(self.stacks.items())}))
            content[K.BASE_DELTA_FACTORS] = self._stack_record
        return content

    def base_delta(self) -> dict[str, torch.Tensor]:
        """W0's change: Σ over rounds of the stacked product."""
        return dict(self.fold)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus every round's stacks and the fold (a resumed run continues on the same W0)."""
        return {**super().state_dict(), "stacks": dict(self.stacks), "fold": dict(self.fold)}

    def load_state_dict(self, state: Any) -> None:
        """Restore `state_dict()`."""
        super().load_state_dict(state)
        self.stacks, self.fold, self._stack_record = dict(state.get("stacks", {})), dict(state.get("fold", {})), None
