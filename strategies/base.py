"""A LoRA-aware base strategy on Flower's FedAvg: sampling, reply checks, bytes, residual.

Methods subclass `LoraStrategy` and override a few hooks: `aggregate_arrays` (the update rule),
`arrays_for` (what a given client is sent), `prepare` (work before round 1, e.g. Fed-SB's init) and
`base_delta` (a change to the frozen base weights the server evaluates and exports, FedEx-LoRA's fold).
Flower's own `start()` loop drives the rounds; `config_record` carries each round's learning rate
(`train.lr_schedule`, `fl.schedule`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl import constants as K
from fl.adapters import module_factors
from fl.schedule import round_lr
from fl.wire import array_bytes, from_record, num_floats, to_record
from strategies.lora_math import (
    combine_residuals,
    ideal_update,
    relative_residual,
    weighted_average,
)
from strategies.validation import reply_problem

log = logging.getLogger(__name__)

DISCOVERY_TIMEOUT = 300.0  # seconds the first hello to a node may take (process start-up included)


def scalars(record: MetricRecord) -> dict[str, float]:
    """The scalar entries of a MetricRecord as floats (lists are left out)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


@dataclass
class RoundStats:
    """What the server saw in one round (one line of metrics.jsonl, with central evaluation)."""

    sampled: int = 0
    replied: int = 0
    aggregated: int = 0
    failed: int = 0  # error replies (exception, timeout) and missing replies
    rejected: int = 0  # replies that failed validation
    declined: int = 0  # clients that chose not to train (e.g. privacy budget spent)
    skipped: bool = False  # too few usable replies: the global adapter stayed as it was
    bytes_down: int = 0
    bytes_up: int = 0
    floats_down: int = 0
    floats_up: int = 0
    train_loss: float = float("nan")
    client_seconds: float = 0.0  # sum of clients' training-loop seconds
    aggregate_seconds: float = 0.0
    residual: float = float("nan")
    round_seconds: float = 0.0  # wall seconds from sending the round's messages to aggregating
    started: float = 0.0  # perf_counter() when the round's messages were built
    extra: dict[str, float] = field(default_factory=dict)


class LoraStrategy(FedAvg):
    """Example-weighted federated LoRA over PEFT adapter tensors.

    Parameters
    ----------
    cfg : DictConfig
        The composed run config (every party composes the same one).
    overrides : list of str
        The Hydra overrides `cfg` was composed from; sent to clients in every message.
    fixed : mapping of str to Tensor
        Frozen adapter tensors the clients hold without being sent them each round (FFA's seeded A,
        Fed-SB's A and B once known). Used to compute the residual.
    """

    adapter_kind: ClassVar[str] = "lora"
    client_dp_problem: ClassVar[str | None] = None
    """Why this method's release is not covered by client-level DP (`strategies.client_dp`); None: it is."""

    def __init__(self, cfg: Any, *, overrides: list[str], fixed: Mapping[str, torch.Tensor]) -> None:
        sim = cfg.sim
        super().__init__(
            fraction_train=float(sim.fraction_train),
            fraction_evaluate=float(sim.fraction_evaluate),
            min_train_nodes=int(sim.min_train_clients),
            min_evaluate_nodes=0,
            min_available_nodes=int(sim.num_clients),
            weighted_by_key=K.NUM_EXAMPLES,
            arrayrecord_key=K.ARRAYS,
            configrecord_key=K.CONFIG,
        )
        self.cfg = cfg
        self.overrides = list(overrides)
        self.fixed: dict[str, torch.Tensor] = dict(fixed)
        self.rng = np.random.default_rng(int(cfg.seed) + 17)
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.stats: dict[int, RoundStats] = {}
        self.expected: dict[str, tuple[int, ...]] = {}
        self.round_offset = 0  # rounds completed before this session (resume); Flower counts from 1
        self.accountants: dict[int, dict[str, Any]] = {}  # partition -> its accountant state (copy, for resume)
        self.uniform_weights = False  # weight every reply 1 instead of n_k (client-level DP's noise assumes it)
        self.releases = 0  # noisy aggregates released under client-level DP (its accountant's steps)

    # ------------------------------------------------------------------ hooks for methods
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

    def state_dict(self) -> dict[str, Any]:
        """Server state beyond the global arrays (for checkpoints)."""
        return {
            "rng": self.rng.bit_generator.state,
            "fixed": dict(self.fixed),
            "accountants": dict(self.accountants),
            "releases": self.releases,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.rng.bit_generator.state = state["rng"]
        self.fixed = dict(state["fixed"])
        self.accountants = dict(state.get("accountants", {}))
        self.releases = int(state.get("releases", 0))

    # ------------------------------------------------------------------ Flower hooks
    def start(self, grid: Grid, initial_arrays: ArrayRecord, **kwargs: Any) -> Any:  # type: ignore[override]
        """Run `prepare`, then Flower's own round loop."""
        return super().start(grid, self.begin(grid, initial_arrays), **kwargs)

    def begin(self, grid: Grid, initial_arrays: ArrayRecord) -> ArrayRecord:
        """`prepare` (unless resumed) and the reply shapes to expect; the arrays round 1 starts from.
        A wrapper around this strategy calls it before Flower's loop."""
        arrays = self.prepare(grid, initial_arrays) if self.round_offset == 0 else initial_arrays
        self.expected = {k: tuple(v.shape) for k, v in from_record(arrays).items()}
        return arrays

    def summary(self) -> None:
        """Log what this strategy is configured to do."""
        s = self.cfg.strategy
        log.info(
            "%s: adapter=%s rank=%d alpha=%s client lr=%g (%s, %d warm-up rounds, floor %g); "
            "sampling %.2f of %d clients per round",
            type(self).__name__,
            self.adapter_kind,
            s.rank,
            s.alpha,
            s.lr,
            self.cfg.train.lr_schedule,
            self.cfg.train.warmup_rounds,
            self.cfg.train.lr_min,
            self.fraction_train,
            self.cfg.sim.num_clients,
        )
        super().summary()

    def config_record(self, server_round: int, phase: str) -> ConfigRecord:
        """The ConfigRecord every message of a round carries."""
        rec: dict[str, Any] = {
            K.SERVER_ROUND: server_round,
            K.PHASE: phase,
            K.OVERRIDES: json.dumps(self.overrides),
            K.ADAPTER_KIND: self.adapter_kind,
        }
        if phase == K.PHASE_TRAIN:
            rec[K.LR] = self.round_lr(server_round)
        rec.update(self.extra_config(server_round))
        return ConfigRecord(rec)

    def round_lr(self, server_round: int) -> float:
        """The clients' learning rate in (absolute) round `server_round`: `train.lr_schedule` from `strategy.lr`."""
        t = self.cfg.train
        return round_lr(
            server_round,
            peak=float(self.cfg.strategy.lr),
            total_rounds=int(self.cfg.sim.rounds),
            schedule=str(t.lr_schedule),
            warmup_rounds=int(t.warmup_rounds),
            lr_min=float(t.lr_min),
        )

    def discover(self, grid: Grid) -> None:
        """Learn the partition id of every connected node not seen yet (one small query each)."""
        node_ids = sorted(grid.get_node_ids())
        new = [n for n in node_ids if n not in self.partition_of]
        if not new:
            return
        msgs = [Message(RecordDict({K.CONFIG: self.config_record(0, "hello")}), n, MessageType.QUERY) for n in new]
        # Fresh ClientApp processes import torch and transformers before answering: give them time,
        # independent of a short round timeout. Nodes that stay silent are asked again next round.
        for reply in grid.send_and_receive(msgs, timeout=max(float(self.cfg.sim.timeout), DISCOVERY_TIMEOUT)):
            if reply.has_error():
                log.warning(
                    "Node %d did not answer the hello query: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            pid = scalars(reply.content.metric_records[K.METRICS])[K.PARTITION_ID]
            self.partition_of[reply.metadata.src_node_id] = int(pid)

    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample nodes reproducibly: a seeded draw over nodes ordered by partition id."""
        self.wait_for_nodes(grid)
        self.discover(grid)
        online = set(grid.get_node_ids())  # a node that left (e.g. a restarted SuperNode's old id) is not sampled
        known = sorted((n for n in self.partition_of if n in online), key=self.partition_of.__getitem__)
        k = min(len(known), max(minimum, round(fraction * len(known))))
        if k == len(known):
            return known
        picks = self.rng.choice(len(known), size=k, replace=False)
        return [known[i] for i in sorted(picks)]

    def wait_for_nodes(self, grid: Grid) -> None:
        """Block until the configured number of nodes is connected (or timeout)."""
        deadline = time.monotonic() + float(self.cfg.sim.timeout)
        while len(list(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Only {len(list(grid.get_node_ids()))} of sim.num_clients="
                    f"{self.min_available_nodes} nodes connected within {self.cfg.sim.timeout} s."
                )
            time.sleep(0.5)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled client exactly the tensors it needs, and count the bytes.

        Entries of `config` (Flower's train config, e.g. a DP wrapper's clipping norm) join every message's own.
        """
        server_round += self.round_offset
        nodes = self.sample(grid, self.fraction_train, self.min_train_nodes)
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.started = time.perf_counter()
        stats.sampled = len(nodes)
        msgs = []
        for node in nodes:
            content = self.arrays_for(node, arrays)
            conf = self.config_record(server_round, K.PHASE_TRAIN)
            for key, value in config.items():
                conf[key] = value
            content[K.CONFIG] = conf
            pid = self.partition_of.get(node)
            if self.round_offset and pid in self.accountants:  # resumed: hand the client its accountant back
                content[K.STATE_PRIVACY] = ConfigRecord(self.accountants[pid])
            stats.bytes_down += array_bytes(content)
            stats.floats_down += sum(num_floats(from_record(r)) for r in content.array_records.values())
            msgs.append(Message(content, node, MessageType.TRAIN))
        log.info(
            "round %d: sending to %d clients, %d bytes down",
            server_round,
            len(nodes),
            stats.bytes_down,
        )
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, aggregate the sound ones with the method's rule."""
        server_round += self.round_offset
        return self.aggregate_screened(server_round, self.screen(server_round, replies))

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Count every reply of (absolute) round `server_round` in its stats; return the sound training replies
        (error replies, declines and replies failing validation are logged and left out)."""
        stats = self.stats.setdefault(server_round, RoundStats())
        good: list[Message] = []
        replies = list(replies)
        stats.failed += max(0, stats.sampled - len(replies))
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                stats.failed += 1
                log.warning("round %d: client on node %d failed: %s", server_round, node, msg.error.reason)
                continue
            stats.replied += 1
            stats.bytes_up += array_bytes(msg.content)
            self.keep_accountant(node, msg)
            record = msg.content.metric_records.get(K.METRICS)
            metrics = scalars(record) if record is not None else {}
            if metrics.get(K.DECLINED, 0.0):
                stats.declined += 1
                decline = msg.content.config_records.get("privacy-decline")  # privacy.policy.DECLINE_RECORD
                why = str(decline["reason"]) if decline is not None and "reason" in decline else "privacy budget"
                log.warning("round %d: client on node %d declined to train: %s", server_round, node, why)
                continue
            problem = reply_problem(msg, expected=self.expected, server_round=server_round)
            if problem is not None:
                stats.rejected += 1
                log.warning("round %d: rejected the reply of node %d: %s", server_round, node, problem)
                continue
            good.append(msg)
        return good

    def aggregate_screened(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies `screen` passed with the method's rule (weights n_k, or 1 with `uniform_weights`)."""
        stats = self.stats.setdefault(server_round, RoundStats())
        good: list[tuple[int, dict[str, torch.Tensor], float, dict[str, float]]] = []
        for msg in replies:
            metrics = scalars(msg.content.metric_records[K.METRICS])
            state = from_record(msg.content.array_records[K.ARRAYS])
            stats.floats_up += num_floats(state)
            weight = 1.0 if self.uniform_weights else metrics[K.NUM_EXAMPLES]
            good.append(
                (self.partition_of.get(msg.metadata.src_node_id, msg.metadata.src_node_id), state, weight, metrics)
            )
        if len(good) < self.min_train_nodes:
            log.warning(
                "round %d: only %d usable replies (< sim.min_train_clients=%d); the global adapter stays as it was",
                server_round,
                len(good),
                self.min_train_nodes,
            )
            stats.skipped = True
            stats.round_seconds = time.perf_counter() - stats.started
            return None, None
        good.sort(key=lambda g: g[0])  # a fixed order makes float sums reproducible
        states, weights = [g[1] for g in good], [g[2] for g in good]
        t0 = time.perf_counter()
        agg = self.aggregate_arrays(server_round, states, weights)
        stats.aggregate_seconds = time.perf_counter() - t0
        stats.aggregated = len(good)
        stats.residual = self.residual(states, weights, agg)
        # DP clients do not report their training loss (an un-noised statistic of their data): NaN then.
        losses = [(w, float(g[3][K.TRAIN_LOSS])) for g, w in zip(good, weights, strict=True) if K.TRAIN_LOSS in g[3]]
        if losses:
            stats.train_loss = sum(w * v for w, v in losses) / sum(w for w, _ in losses)
        stats.client_seconds = sum(g[3].get(K.TRAIN_SECONDS, 0.0) for g in good)
        eps = [g[3][K.EPSILON] for g in good if K.EPSILON in g[3]]
        if eps:
            stats.extra["epsilon_max"] = max(eps)
            stats.extra["epsilon_mean"] = sum(eps) / len(eps)
        stats.round_seconds = time.perf_counter() - stats.started
        metrics_out = MetricRecord({"train-loss": stats.train_loss, "aggregated": len(good)})
        return to_record(agg), metrics_out

    def keep_accountant(self, node: int, msg: Message) -> None:
        """Keep a copy of the privacy accountant state a client reports (restored to it after a resume)."""
        if K.STATE_PRIVACY in msg.content.config_records:
            record = msg.content.config_records[K.STATE_PRIVACY]
            self.accountants[self.partition_of.get(node, node)] = dict(record.items())

    def residual(
        self,
        states: list[dict[str, torch.Tensor]],
        weights: list[float],
        agg: Mapping[str, torch.Tensor],
    ) -> float:
        """‖Σ p_k B_k A_k − B̄Ā‖ / ‖Σ p_k B_k A_k‖ over all adapted modules (0 = exact)."""
        per_client = [module_factors({**self.fixed, **s}) for s in states]
        agg_f = module_factors({**self.fixed, **agg})
        parts = []
        for prefix, (b_bar, a_bar) in agg_f.items():
            dw = ideal_update([f[prefix][1] for f in per_client], [f[prefix][0] for f in per_client], weights)
            parts.append(relative_residual(dw, b_bar, a_bar))
        return combine_residuals(parts)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation on clients' own data when sim.fraction_evaluate > 0."""
        server_round += self.round_offset
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.sample(grid, self.fraction_evaluate, 1)
        msgs = []
        for node in nodes:
            content = self.arrays_for(node, arrays)
            content[K.CONFIG] = self.config_record(server_round, "evaluate")
            msgs.append(Message(content, node, MessageType.EVALUATE))
        return msgs
