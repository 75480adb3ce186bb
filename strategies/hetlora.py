"""HetLoRA: clients of different ranks; zero-pad to r_max, sparsity-weighted average, truncate on the way down,
and let clients prune ranks that stop contributing.

Cho, Manoel, Joshi, Sahu, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024, https://arxiv.org/abs/2401.06432

Update rule, per adapted module, with s_k = alpha / r_k and R = strategy.rank = r_max:
pad s_k·B_k (d_out × r_k) and A_k (r_k × d_in) with zeros to R, weight client k by
w_k = ‖B_k A_k‖_F / Σ_j ‖B_j A_j‖_F (sparsity-weighted aggregation), B̄ = Σ w_k pad(s_k B_k) / s_R,
Ā = Σ w_k pad(A_k); client k gets the first r_k components (B̄[:, :r_k]·s_R / s_k, Ā[:r_k]).
Self-pruning (`strategy.prune_gamma` = γ < 1): a client's rank drops to ⌊γ r⌋ when its trailing components
contribute less than the round before. The server holds the same factors the client sent, so it decides for the
client and sends the dropped components as zeros: with A rows and B columns both zero their gradients are zero,
so they stay pruned (the uplink still carries them: the client's adapter keeps its shape). γ = 1 turns it off.
The head is example-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict

from fl import constants as K
from fl.adapters import A_SUFFIX, B_SUFFIX
from fl.config import StrategyConfig
from fl.wire import from_record, to_record
from strategies.hetero import HeteroLoRA, modules
from strategies.hetero_math import hetlora_aggregate, prune_decision, prune_keep, sparsity_weights, tail_norm, zero_pad
from strategies.screening import Reply


@dataclass
class HetLoRAConfig(StrategyConfig):
    """HetLoRA's fields: the self-pruning factor γ (1 = no pruning)."""

    prune_gamma: float = 1.0


class HetLoRA(HeteroLoRA):
    """HetLoRA (https://arxiv.org/abs/2401.06432): zero-pad, sparsity-weighted average, truncate, self-prune."""

    title: ClassVar[str] = "HetLoRA"

    schema: ClassVar[type[StrategyConfig]] = HetLoRAConfig
    update_space: ClassVar[str] = "padded"  # a defence acts on pad(s_k B_k / s_R), pad(A_k): the space it averages in

    def __init__(self, *, prune_gamma: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < prune_gamma <= 1:
            raise ValueError(f"strategy.prune_gamma={prune_gamma} is invalid: use γ in (0, 1] (1 = no pruning).")
        self.prune_gamma = prune_gamma
        self.active: dict[int, int] = {}  # partition -> its rank after self-pruning
        self.tails: dict[int, float] = {}  # partition -> its trailing components' norm last round
        self._own: list[tuple[int, dict[str, torch.Tensor]]] = []  # this round's (partition, factors as sent)

    @classmethod
    def params_from_config(cls, cfg: Any) -> dict[str, Any]:
        """The base fields plus `prune_gamma`."""
        return {**super().params_from_config(cfg), "prune_gamma": float(cfg.strategy.prune_gamma)}

    def aggregate_screened(self, server_round: int, replies: list[Reply], *, release: bool = False) -> Any:
        """Remember each client's own factors (self-pruning is per client, on what it sent, whatever a defence
        hands the rule), then aggregate."""
        self._own = [(r.partition, r.state) for r in sorted(replies, key=lambda r: r.partition)]
        return super().aggregate_screened(server_round, replies, release=release)

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """Sparsity-weighted average of the zero-padded, scaled factors; then each client's self-pruning."""
        agg = self.others(states, weights)
        s_max = self.scaling(self.rank)
        for prefix, (As, Bs, s) in self.updates(states, weights).items():
            scaled = [sk * b for b, sk in zip(Bs, s, strict=True)]
            B, A = hetlora_aggregate(As, scaled, sparsity_weights(As, scaled), self.rank)
            agg[prefix + A_SUFFIX], agg[prefix + B_SUFFIX] = A, B / s_max
        if self.prune_gamma < 1:
            self._prune()
        return agg

    def _prune(self) -> None:
        """Each client's self-pruning, one decision over all its modules (their trailing norms combined)."""
        for pid, state in self._own:
            prefixes = list(modules(state))
            rank = self.active.get(pid, state[prefixes[0] + A_SUFFIX].shape[0])
            keep = prune_keep(rank, self.prune_gamma)
            tail = sum(
                tail_norm(state[p + B_SUFFIX][:, :rank], state[p + A_SUFFIX][:rank], keep) ** 2 for p in prefixes
            )
            new = prune_decision(rank, gamma=self.prune_gamma, tail=tail**0.5, previous=self.tails.get(pid))
            self.active[pid] = new
            if new < rank:
                self.tails.pop(pid, None)  # a new rank: its tail is compared from the next round on
            else:
                self.tails[pid] = tail**0.5
        if self.active:
            stats = self.stats[max(self.stats)]
            stats.extra["rank_active_mean"] = sum(self.active.values()) / len(self.active)

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """The first r_k components (rescaled to the client's s_k), pruned ones as zeros."""
        rank = self.node_rank(node_id)
        active = min(rank, self.active.get(self.sampler.partition_of.get(node_id, -1), rank))
        if rank == self.rank and active == rank:
            return super().arrays_for(node_id, arrays)
        state = from_record(arrays)
        ratio = self.scaling(self.rank) / self.scaling(rank)
        for prefix in [n[: -len(A_SUFFIX)] for n in state if n.endswith(A_SUFFIX)]:
            B, A = state[prefix + B_SUFFIX][:, :active] * ratio, state[prefix + A_SUFFIX][:active]
            B, A = zero_pad(B, A, rank)
            state[prefix + A_SUFFIX], state[prefix + B_SUFFIX] = A.contiguous(), B.contiguous()
        return RecordDict({K.ARRAYS: to_record(state)})

    def state_dict(self) -> dict[str, Any]:
        """The base state plus each client's active rank and tail norm."""
        return {**super().state_dict(), "active": dict(self.active), "tails": dict(self.tails)}

    def load_state_dict(self, state: Any) -> None:
        """Restore `state_dict()`."""
        super().load_state_dict(state)
        self.active, self.tails = dict(state.get("active", {})), dict(state.get("tails", {}))
