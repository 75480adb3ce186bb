"""Fed-SB: frozen A and B shared by all, only the r × r matrix R trains and is averaged.

Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in
(Private) Federated LoRA Fine-Tuning", 2025, https://arxiv.org/abs/2502.15436 (code: CERT-Lab/fed-sb;
builds on LoRA-SB).

W = W0 + B·R·A with A (r × d_in) and B (d_out × r) frozen, scaling 1. Update rule: R̄ = Σ_k p_k R_k;
exact, because B·R̄·A = Σ_k p_k B·R_k·A. Uplink r² per module, independent of the width.

Initialisation (`strategy.init=federated`), once before round 1: each client sends the dense gradient
sum G_k of the loss w.r.t. every adapted W0 over `strategy.init_examples` of its examples; the server
sums G = Σ_k G_k, takes G̃ = −η·sign(G) (η = `strategy.init_lr`) and factorises G̃ ≈ B·R0·A by a
truncated SVD (see `lora_math.fedsb_init_factors`), so the model starts at W0 + trunc_r(G̃). A and B go
to each client once, the first time it is sampled; all of it is counted in the byte totals (round 0
holds the init traffic). `strategy.init=random` starts from random orthonormal A, B and R = 0.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl import constants as K
from fl.adapters import A_SUFFIX, SB_B_SUFFIX, SB_R_SUFFIX
from fl.wire import array_bytes, from_record, num_floats, to_record
from strategies.base import LoraStrategy, RoundStats, scalars
from strategies.lora_math import fedsb_init_factors

log = logging.getLogger(__name__)

BASE_SUFFIX = ".base_layer.weight"  # the frozen W0 inside a PEFT LoRA layer


class FedSB(LoraStrategy):
    """Fed-SB (https://arxiv.org/abs/2502.15436): average only R; A and B sent once per client."""

    adapter_kind: ClassVar[str] = "fedsb"

    def __init__(self, cfg: Any, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.has_frozen: set[int] = set()  # nodes that hold the current A and B

    def prepare(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """Federated initialisation of A, B, R0 from the clients' gradient sums (if configured)."""
        if self.cfg.strategy.init == "random":
            return arrays
        if self.cfg.strategy.init != "federated":
            raise ValueError(f"strategy.init={self.cfg.strategy.init!r} is unknown; use federated or random.")
        stats = self.stats.setdefault(0, RoundStats())
        nodes = self.sample(grid, 1.0, 1)
        msgs = []
        for node in nodes:
            content = RecordDict({K.CONFIG: self.config_record(0, K.PHASE_INIT_GRAD)})
            msgs.append(Message(content, node, MessageType.TRAIN))
        grad_sum: dict[str, torch.Tensor] = {}
        contributors = 0
        eps: list[float] = []
        for reply in grid.send_and_receive(msgs, timeout=float(self.cfg.sim.timeout)):
            if reply.has_error():
                stats.failed += 1
                log.warning(
                    "Fed-SB init: node %d failed: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            stats.bytes_up += array_bytes(reply.content)
            self.keep_accountant(reply.metadata.src_node_id, reply)
            reported = scalars(reply.content.metric_records[K.METRICS])
            if K.EPSILON in reported:
                eps.append(reported[K.EPSILON])
            grads = from_record(reply.content.array_records[K.ARRAYS])
            if not all(bool(torch.isfinite(g).all()) for g in grads.values()):
                stats.rejected += 1
                log.warning(
                    "Fed-SB init: node %d sent a non-finite gradient; ignored",
                    reply.metadata.src_node_id,
                )
                continue
            stats.floats_up += num_floats(grads)
            for name, g in grads.items():
                grad_sum[name] = grad_sum[name] + g.double() if name in grad_sum else g.double()
            contributors += 1
        if contributors == 0:
            raise RuntimeError("Fed-SB init: no client sent a usable init gradient; cannot start.")
        state = from_record(arrays)
        fixed: dict[str, torch.Tensor] = {}
        rank, lr = int(self.cfg.strategy.rank), float(self.cfg.strategy.init_lr)
        for name, g in grad_sum.items():
            prefix = name[: -len(BASE_SUFFIX)]
            a, b, r0 = fedsb_init_factors(g.float(), rank=rank, lr=lr)
            fixed[prefix + A_SUFFIX], fixed[prefix + SB_B_SUFFIX] = a, b
            state[prefix + SB_R_SUFFIX] = r0
        missing = {k for k in self.fixed if k not in fixed}
        if missing:
            raise RuntimeError(f"Fed-SB init: no gradient for {sorted(missing)[:2]}.")
        self.fixed = fixed
        stats.extra["init_clients"] = contributors
        if eps:  # the privatised init gradient's cost, per client
            stats.extra["epsilon_max"], stats.extra["epsilon_mean"] = max(eps), sum(eps) / len(eps)
        log.info(
            "Fed-SB init: A, B, R0 from %d clients' gradients (%d bytes up)",
            contributors,
            stats.bytes_up,
        )
        return to_record(state)

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """R and the head every round; the frozen A and B too the first time a node is sent work."""
        content = RecordDict({K.ARRAYS: arrays})
        if node_id not in self.has_frozen:
            content[K.FROZEN] = to_record(self.fixed)
            self.has_frozen.add(node_id)
        return content

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        """As the base; a node whose reply failed is sent A and B again next time."""
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                self.has_frozen.discard(msg.metadata.src_node_id)
        return super().aggregate_train(server_round, replies)

    def materialize(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """R and the head from `arrays`, A and B from the server's state."""
        return {**self.fixed, **from_record(arrays)}
