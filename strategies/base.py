"""A LoRA-aware base strategy on Flower's FedAvg: per-client messages, reply screening, bytes, residual.

Methods subclass `LoraStrategy` and override a few hooks (`strategies.hooks`); `from_config` (`strategies.bridge`)
reads their typed fields from Hydra, checked at compose time. Flower's own `start()` loop drives the rounds;
sampling, reply screening, round statistics and message records live in modules of their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl import constants as K
from fl.wire import from_record, num_floats, to_record
from strategies.averaging import ModelAverage
from strategies.bridge import ConfigBridge
from strategies.carried import AccountantCopies
from strategies.hooks import MethodHooks
from strategies.messages import RoundConfig
from strategies.robust import RobustAggregation
from strategies.sampling import EVAL_SALT, NodeSampler
from strategies.scaffold import ScaffoldServer
from strategies.screening import Reply, screen
from strategies.server_opt import ServerOptimizer
from strategies.stats import RoundStats

log = logging.getLogger(__name__)

ServerGradient = Callable[[], dict[str, torch.Tensor]]
"""The loss gradient w.r.t. every adapted W0 on the server's own init data (Fed-SB's init=server), by base-weight
name; built by the app, which owns the model and the data."""


class LoraStrategy(ConfigBridge, MethodHooks, FedAvg):
    """Example-weighted federated LoRA over PEFT adapter tensors.

    Parameters
    ----------
    overrides : list of str
        The Hydra overrides the run was composed from; sent to clients in every message.
    fixed : mapping of str to Tensor
        Frozen adapter tensors the clients hold without being sent each round (FFA's A, Fed-SB's A and B).
    num_nodes : int
        Clients to wait for (`sim.num_clients`). rounds : int — rounds the learning-rate schedule spans.
    rank, alpha : int, float
        The LoRA rank r and scaling numerator (s = alpha / r).
    lr, lr_schedule, warmup_rounds, lr_min
        The clients' peak learning rate and its shape across rounds (`fl.schedule`).
    fraction_train, fraction_evaluate, min_train_nodes, timeout, seed
        Sampling, the smallest aggregate, seconds to wait for replies, the run seed.
    server_gradient : callable, optional
        For methods whose init needs the server's own gradient (Fed-SB's init=server); others ignore it.
    robust : RobustAggregation, optional
        The reply defence and example-weight cap (`strategy.defence`, `strategy.max_examples_weight`).
    server_opt : ServerOptimizer, optional
        The step from this round's aggregate to the next global arrays (`server_opt=`; default: the aggregate).
    scaffold : ScaffoldServer, optional
        SCAFFOLD's control variate c (`drift=scaffold`, `strategies.scaffold`); default: none.
    average : ModelAverage, optional
        The running mean of the rounds' globals the server scores and exports (`server_opt.average_from`,
        `strategies.averaging`); default: none (the global itself).
    """

    def __init__(
        self,
        *,
        overrides: Sequence[str],
        fixed: Mapping[str, torch.Tensor],
        num_nodes: int,
        rounds: int,
        rank: int = 8,
        alpha: float = 16.0,
        lr: float = 1e-3,
        lr_schedule: str = "constant",
        warmup_rounds: int = 0,
        lr_min: float = 0.0,
        fraction_train: float = 1.0,
        client_sampling: str = "uniform",
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        timeout: float = 3600.0,
        seed: int = 0,
        server_gradient: ServerGradient | None = None,
        robust: RobustAggregation | None = None,
        server_opt: ServerOptimizer | None = None,
        average: ModelAverage | None = None,
        scaffold: ScaffoldServer | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0,
            min_available_nodes=num_nodes,
            weighted_by_key=K.NUM_EXAMPLES,
            arrayrecord_key=K.ARRAYS,
            configrecord_key=K.CONFIG,
        )
        if rank < 1:
            raise ValueError(f"strategy.rank={rank} is invalid: the LoRA rank must be a positive integer.")
        self.fixed: dict[str, torch.Tensor] = dict(fixed)
        self.rank, self.alpha, self.rounds, self.seed = rank, alpha, rounds, seed
        sched = (lr, rounds, lr_schedule, warmup_rounds, lr_min)  # the clients' learning rate, round by round
        self.round_config = RoundConfig(list(overrides), self.adapter_kind, *sched)
        self.timeout, self.server_gradient = timeout, server_gradient
        hello = partial(self.config_record, 0, K.PHASE_HELLO)
        cyclic = client_sampling == "cyclic"  # sim.client_sampling (bridge.py checks the value)
        self.sampler = NodeSampler(seed=seed, num_nodes=num_nodes, timeout=timeout, hello=hello, cyclic=cyclic)
        self.stats: dict[int, RoundStats] = {}
        self.expected: dict[str, tuple[int, ...]] = {}
        self.round_offset = 0  # rounds completed before this session (resume); Flower counts from 1
        self.accountants = AccountantCopies()  # each client's last reported accountant (handed back on resume)
        self.releases = 0  # aggregates released under client-level DP (its accountant's steps; `aggregate_screened`)
        self.robust = robust or RobustAggregation()  # strategy.defence and strategy.max_examples_weight
        self.round_arrays: ArrayRecord | None = None  # the global arrays of this round (a defence's reference)
        self.server_opt = server_opt or ServerOptimizer()  # server_opt=: the step from aggregate to global
        self.opt_before: dict[str, torch.Tensor] = {}  # this round's global state as the server optimizer sees it
        self.scaffold = scaffold or ScaffoldServer(num_clients=num_nodes, enabled=False)  # drift=scaffold: c
        self.average = average or ModelAverage()  # server_opt.average_from: the model scored and exported (SWA)

    def state_dict(self) -> dict[str, Any]:
        """Server state beyond the global arrays (for checkpoints)."""
        return {
            "rng": self.sampler.state_dict()["rng"],
            "sampler_queue": self.sampler.state_dict()["queue"],
            "fixed": dict(self.fixed),
            "accountants": self.accountants.state_dict(),
            "releases": self.releases,
            "robust": self.robust.state_dict(),
            "server_opt": self.server_opt.state_dict(),
            "scaffold": self.scaffold.state_dict(),
            "average": self.average.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.sampler.load_state_dict({"rng": state["rng"], "queue": state.get("sampler_queue", [])})
        self.fixed = dict(state["fixed"])
        self.accountants.load_state_dict(state.get("accountants", {}))
        self.releases = int(state.get("releases", 0))
        self.robust.load_state_dict(state.get("robust", {}))
        self.server_opt.load_state_dict(state.get("server_opt", {}))
        self.scaffold.load_state_dict(state.get("scaffold", {}))
        self.average.load_state_dict(state.get("average", {}))

    # ------------------------------------------------------------------ Flower hooks
    def start(self, grid: Grid, initial_arrays: ArrayRecord, **kwargs: Any) -> Any:  # type: ignore[override]
        """Run `prepare`, then Flower's own round loop."""
        return super().start(grid, self.begin(grid, initial_arrays), **kwargs)

    def begin(self, grid: Grid, initial_arrays: ArrayRecord) -> ArrayRecord:
        """`prepare` (unless resumed) and the reply shapes to expect; the arrays round 1 starts from.
        A wrapper around this strategy calls it before Flower's loop."""
        arrays = self.prepare(grid, initial_arrays) if self.round_offset == 0 else initial_arrays
        self.expected = {k: tuple(v.shape) for k, v in from_record(arrays).items()}
        self.scaffold.begin(self.expected)  # c lives in the trained space: the arrays a reply carries
        return arrays

    def summary(self) -> None:
        """Log what this strategy is configured to do, then Flower's summary."""
        log.info(
            "%s: rank=%d alpha=%s %s; sampling %.2f of %d clients per round",
            type(self).__name__,
            self.rank,
            self.alpha,
            self.round_config.describe(),
            self.fraction_train,
            self.sampler.num_nodes,
        )
        if self.robust.active:  # the default (no defence, no cap) says nothing
            log.info("%s: %s", type(self).__name__, self.robust.describe())
        if self.server_opt.active:
            log.info("%s: %s", type(self).__name__, self.server_opt.describe())
        if self.scaffold.active:
            log.info("%s: %s", type(self).__name__, self.scaffold.describe())
        if self.average.active:
            log.info("%s: %s", type(self).__name__, self.average.describe(self.rounds))
        super().summary()

    def config_record(self, server_round: int, phase: str, *extra: Mapping[str, Any]) -> ConfigRecord:
        """The ConfigRecord a message of this round and phase carries (with the method's `extra_config`)."""
        return self.round_config.record(server_round, phase, self.extra_config(server_round), *extra)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled client exactly the tensors it needs, and count the bytes.

        Not FedAvg's, which sends all nodes the same: each gets its own (Fed-SB's A and B once, a resumed client's
        accountant). Entries of `config` (Flower's train config, e.g. a DP wrapper's clip) join each message's own.
        """
        server_round += self.round_offset
        self.round_arrays = arrays
        if self.server_opt.active:  # what the pseudo-gradient is measured from (a copy: methods reuse buffers)
            self.opt_before = {k: v.clone() for k, v in self.optimizer_view(from_record(arrays)).items()}
        nodes = self.sampler.sample(grid, self.fraction_train, self.min_train_nodes)
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.begin(len(nodes))
        msgs = self.messages(nodes, arrays, server_round, K.PHASE_TRAIN, dict(config.items()))
        for msg in msgs:
            partition = self.sampler.partition_of.get(msg.metadata.dst_node_id)
            if self.round_offset:  # resumed: hand the client its accountant back
                self.accountants.hand_back(msg.content, partition)
            self.scaffold.attach(msg.content, partition, resumed=bool(self.round_offset))  # drift=scaffold: c
            stats.count_down(msg.content)
        log.info("round %d: sending to %d clients, %d bytes down", server_round, len(nodes), stats.bytes_down)
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply, aggregate the sound ones with the method's rule (FedAvg's assumes one update rule
        over whole arrays and no declines; `aggregate_arrays` is the method's hook instead)."""
        server_round += self.round_offset
        arrays, metrics = self.aggregate_screened(server_round, self.screen(server_round, replies))
        return self.server_step(server_round, arrays), metrics

    def server_step(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The next global arrays: the server optimizer's step from this round's global state towards the
        aggregate `arrays` (`strategies.server_opt`), on the tensors `optimizer_view` names; the aggregate itself
        with `server_opt=none`. A client-level DP wrapper calls it after adding its noise (post-processing)."""
        if arrays is None or not self.server_opt.active:
            return arrays
        agg = from_record(arrays)
        view = self.optimizer_view(agg)
        stepped = self.server_opt.step(server_round, self.opt_before, view)
        stats = self.stats.setdefault(server_round, RoundStats())
        num = sum(float(((stepped[k].double() - self.opt_before[k].double()) ** 2).sum()) for k in view)
        den = sum(float(((view[k].double() - self.opt_before[k].double()) ** 2).sum()) for k in view)
        stats.extra[K.SERVER_STEP_RATIO] = (num / den) ** 0.5 if den > 0 else 0.0
        return to_record(self.with_optimizer_view(agg, stepped))

    def scored(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The global arrays the server scores after (absolute) round `server_round`: `arrays`, or the running mean
        of the rounds' globals from `server_opt.average_from` on (`strategies.averaging`; call once a round)."""
        if not self.average.active:
            return arrays
        return to_record(self.average.update(server_round, from_record(arrays)))

    def exported(self, arrays: ArrayRecord) -> ArrayRecord:
        """The arrays the run exports, given the last global `arrays`: those, or the mean `scored` last returned."""
        return to_record(self.average.model(from_record(arrays))) if self.average.active else arrays

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Reply]:
        """The sound training replies of (absolute) round `server_round`, each decoded once (`screening.screen`)."""
        return screen(
            server_round,
            replies,
            expected=self.expected_for,
            stats=self.stats.setdefault(server_round, RoundStats()),
            partition_of=self.sampler.partition_of,
            on_reply=partial(self.accountants.keep, self.sampler.partition_of),
            records=self.scaffold.reply_records(),
        )

    def aggregate_screened(
        self, server_round: int, replies: list[Reply], *, release: bool = False
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate screened replies with the method's rule (weights n_k). `release`: the aggregate is released
        under client-level DP (`strategies.client_dp` noises it): every reply weighs 1, as the noise σC/m assumes,
        and it counts as one more release (`releases`)."""
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.floats_up += sum(num_floats(r.state) for r in replies)
        self.scaffold.absorb(replies, stats)  # drift=scaffold: c from every screened reply's Δc_i
        if len(replies) < self.min_train_nodes:
            stats.skip(server_round, len(replies), self.min_train_nodes)
            return None, None
        good = sorted(replies, key=lambda r: r.partition)  # a fixed order makes float sums reproducible
        claimed = [1.0 if release else r.metrics[K.NUM_EXAMPLES] for r in good]
        t0 = time.perf_counter()
        kept = self.robust.apply(good, claimed, reference=self.round_arrays, space=self.update_space, stats=stats)
        states, weights = kept.states, kept.weights  # the replies, or what the defence made of them
        agg = self.aggregate_arrays(server_round, states, weights)
        stats.aggregate_seconds = time.perf_counter() - t0
        res, metrics = self.residual(states, weights, agg), [r.metrics for r in kept.replies]
        stats.record_aggregate(metrics, kept.client_weights, res, ranks=self.mixed_ranks)
        if release:
            self.releases += 1
        return to_record(agg), MetricRecord({K.TRAIN_LOSS: stats.train_loss, K.AGGREGATED: len(kept.replies)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Per-client evaluation when `fraction_evaluate` > 0: each sampled client scores the model it would keep
        on its own held-out share (`data.client_test_fraction`); per-node content, as in training."""
        server_round += self.round_offset
        if self.fraction_evaluate == 0.0:
            return []
        # the same seeded clients every round, from a generator of their own (the training draws stay as they were)
        nodes = self.sampler.subset(grid, self.fraction_evaluate, salt=EVAL_SALT)
        self.stats.setdefault(server_round, RoundStats()).eval_sent = len(nodes)
        return self.messages(nodes, arrays, server_round, K.PHASE_EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client evaluation's spread over clients (`RoundStats.record_evaluation`; FedAvg's only averages)."""
        server_round += self.round_offset
        if self.fraction_evaluate == 0.0:
            return None
        return self.stats.setdefault(server_round, RoundStats()).record_evaluation(server_round, replies)

    def messages(
        self, nodes: Iterable[int], arrays: ArrayRecord, server_round: int, phase: str, *extra: Mapping[str, Any]
    ) -> list[Message]:
        """One message per node: the arrays it needs (`arrays_for`) and the round's ConfigRecord."""
        mtype = MessageType.TRAIN if phase == K.PHASE_TRAIN else MessageType.EVALUATE
        msgs = []
        for node in nodes:
            content = self.arrays_for(node, arrays)
            content[K.CONFIG] = self.config_record(server_round, phase, *extra)
            msgs.append(Message(content, node, mtype))
        return msgs
