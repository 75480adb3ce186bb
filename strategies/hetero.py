"""What the heterogeneous-rank methods share: each node's rank, the shapes it replies with, factors by module.

A node's rank comes from its hello reply (`fl.ranks.client_rank`: its node config `lora-rank`, else
`sim.client_ranks`). The server's own adapter (central evaluation, export) has rank `strategy.rank`, which must
hold every client's: `strategy.rank >= max(sim.client_ranks)`. Client k's LoRA scaling is PEFT's s_k = alpha / r_k,
so its update is s_k·B_k·A_k; the methods aggregate those updates, not the raw factors. A defence
(`strategy.defence`) compares clients there too (`strategies.robust_mixed`): FLoRA's and FlexLoRA's rules read only
the products, so theirs act on s_k·B_k·A_k; HetLoRA's on its zero-padded r_max factors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch

from fl.adapters import A_SUFFIX, B_SUFFIX
from strategies.base import LoraStrategy
from strategies.hetero_math import weighted_product
from strategies.lora_math import combine_residuals, weighted_average


def shapes_at_rank(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """The reply shapes of a client of rank `rank`: A (r × d_in), B (d_out × r); other tensors (a head) as given."""
    out = dict(shapes)
    for name, shape in shapes.items():
        if name.endswith(A_SUFFIX):
            out[name] = (rank, shape[1])
        elif name.endswith(B_SUFFIX):
            out[name] = (shape[0], rank)
    return out


def modules(state: Mapping[str, torch.Tensor]) -> Iterator[str]:
    """The adapted modules' name prefixes in `state` (each has prefix + A_SUFFIX and prefix + B_SUFFIX)."""
    return (n[: -len(A_SUFFIX)] for n in sorted(state) if n.endswith(A_SUFFIX))


class HeteroLoRA(LoraStrategy):
    """Base of FLoRA, FlexLoRA and HetLoRA: clients of different ranks (not a method of its own)."""

    adapter_kind: ClassVar[str] = "lora"
    mixed_ranks: ClassVar[bool] = True
    update_space: ClassVar[str] = "scaled_product"  # a defence acts on s_k·B_k·A_k, one shape for every rank
    client_dp_problem: ClassVar[str | None] = (
        "its clients reply at ranks of their own and the server step reads each client's factors, so updates "
        "cannot be clipped and noised against one global adapter"
    )

    @classmethod
    def params_from_config(cls, cfg: Any) -> dict[str, Any]:
        """The base fields; the server's rank must hold every client rank the run lists."""
        params = super().params_from_config(cfg)
        listed = [int(r) for r in (cfg.sim.client_ranks or [])]
        if listed and max(listed) > int(cfg.strategy.rank):
            raise ValueError(
                f"strategy.rank={cfg.strategy.rank} is below max(sim.client_ranks)={max(listed)}: the server's "
                f"global adapter holds every client's rank; set strategy.rank={max(listed)}."
            )
        return params

    def node_rank(self, node: int) -> int:
        """The rank `node` trains at (its hello reply), else the server's."""
        return self.sampler.rank_of.get(node, self.rank)

    def expected_for(self, node: int) -> Mapping[str, tuple[int, ...]]:
        """A node replies at its own rank."""
        return shapes_at_rank(self.expected, self.node_rank(node))

    def scaling(self, rank: int) -> float:
        """PEFT's LoRA scaling of a client of rank `rank`: alpha / rank."""
        return self.alpha / rank

    def others(self, states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
        """The example-weighted average of every tensor that is not a LoRA factor (the task head)."""
        rest = [{k: v for k, v in s.items() if not k.endswith((A_SUFFIX, B_SUFFIX))} for s in states]
        return weighted_average(rest, weights) if rest and rest[0] else {}

    def updates(
        self, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[float]]]:
        """Per module: the clients' A_k, B_k and scalings s_k."""
        out = {}
        for prefix in modules(states[0]):
            As = [s[prefix + A_SUFFIX] for s in states]
            out[prefix] = (As, [s[prefix + B_SUFFIX] for s in states], [self.scaling(a.shape[0]) for a in As])
        return out

    def residual(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], agg: Mapping[str, torch.Tensor]
    ) -> float:
        """‖Σ p_k s_k B_k A_k − s·B̄Ā‖ / ‖Σ p_k s_k B_k A_k‖ over modules (s = alpha / strategy.rank)."""
        parts = []
        for prefix, (As, Bs, s) in self.updates(states, weights).items():
            dw = weighted_product(As, Bs, weights, s)
            got = self.scaling(self.rank) * agg[prefix + B_SUFFIX].double() @ agg[prefix + A_SUFFIX].double()
            parts.append((float(((dw - got) ** 2).sum()), float((dw**2).sum())))
        return combine_residuals(parts)
