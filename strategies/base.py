"""A LoRA-aware base strategy on Flower's FedAvg: per-client messages, reply screening, bytes, residual.

Methods subclass `LoraStrategy` and override a few hooks: `aggregate_arrays` (the update rule),
`arrays_for` (what a given client is sent), `prepare` (work before round 1, e.g. Fed-SB's init) and
`base_delta` (a change to the frozen base weights the server evaluates and exports, FedEx-LoRA's fold).
A method is built from typed keyword arguments; `from_config(cfg, ...)` is its one bridge to Hydra and its
constructor checks the method's fields, so `fl.app.config.compose` fails on a bad value before any client trains.
Flower's own `start()` loop drives the rounds; sampling (`strategies.sampling`), reply screening
(`strategies.screening`) and round statistics (`strategies.stats`) live in modules of their own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl import constants as K
from fl import ranks
from fl.config import StrategyConfig
from fl.schedule import round_lr
from fl.wire import array_bytes, from_record, num_floats, to_record
from strategies.lora_math import aggregation_residual, weighted_average
from strategies.robust import RobustAggregation
from strategies.sampling import NodeSampler
from strategies.screening import Reply, screen
from strategies.stats import RoundStats

log = logging.getLogger(__name__)

HETERO_METHODS = ("flora", "flexlora", "hetlora")
"""The registered methods that take mixed client ranks (named in the refusal of the others)."""

ServerGradient = Callable[[], dict[str, torch.Tensor]]
"""The loss gradient w.r.t. every adapted W0 on the server's own init data (Fed-SB's init=server), by base-weight
name; built by the app, which owns the model and the data."""


class LoraStrategy(FedAvg):
    """Example-weighted federated LoRA over PEFT adapter tensors.

    Parameters
    ----------
    overrides : list of str
        The Hydra overrides the run was composed from; sent to clients in every message.
    fixed : mapping of str to Tensor
        Frozen adapter tensors the clients hold without being sent them each round (FFA's seeded A,
        Fed-SB's A and B once known). Used to compute the residual.
    num_nodes : int
        Clients to wait for (`sim.num_clients`). rounds : int — rounds the learning-rate schedule spans.
    rank, alpha : int, float
        The LoRA rank r and scaling numerator (s = alpha / r).
    lr : float
        The clients' peak learning rate; `lr_schedule` (constant | cosine), `warmup_rounds`, `lr_min` shape it
        across rounds (`fl.schedule`).
    fraction_train, fraction_evaluate, min_train_nodes, timeout, seed
        Sampling, the smallest aggregate, seconds to wait for replies, the run seed.
    server_gradient : callable, optional
        For methods whose init needs the server's own gradient (Fed-SB's init=server); others ignore it.
    """

    adapter_kind: ClassVar[str] = "lora"
    """The adapter every party builds for this method (`fl.adapters.build_adapter`)."""
    schema: ClassVar[type[StrategyConfig]] = StrategyConfig
    """The method's Hydra schema (`/schema/strategy/<name>`): its fields and their types."""
    client_dp_problem: ClassVar[str | None] = None
    """Why this method's release is not covered by client-level DP (`strategies.client_dp`); None: it is."""
    mixed_ranks: ClassVar[bool] = False
    """Whether clients may train at ranks of their own (`sim.client_ranks`, node config `lora-rank`; `fl.ranks`)."""
    update_space: ClassVar[str] = "factors"
    """Where a client's update lives for a defence (`strategies.robust_math`): factors | product (B_k·A_k)."""

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
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        timeout: float = 3600.0,
        seed: int = 0,
        server_gradient: ServerGradient | None = None,
        robust: RobustAggregation | None = None,
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
        self.overrides = list(overrides)
        self.fixed: dict[str, torch.Tensor] = dict(fixed)
        self.rank, self.alpha, self.lr, self.rounds, self.seed = rank, alpha, lr, rounds, seed
        self.lr_schedule, self.warmup_rounds, self.lr_min = lr_schedule, warmup_rounds, lr_min
        self.timeout = timeout
        self.server_gradient = server_gradient
        self.sampler = NodeSampler(seed=seed, num_nodes=num_nodes, timeout=timeout, hello=self._hello)
        self.stats: dict[int, RoundStats] = {}
        self.expected: dict[str, tuple[int, ...]] = {}
        self.round_offset = 0  # rounds completed before this session (resume); Flower counts from 1
        self.accountants: dict[int, dict[str, Any]] = {}  # partition -> its accountant state (copy, for resume)
        self.uniform_weights = False  # weight every reply 1 instead of n_k (client-level DP's noise assumes it)
        self.releases = 0  # noisy aggregates released under client-level DP (its accountant's steps)
        self.robust = robust or RobustAggregation()  # strategy.defence and strategy.max_examples_weight
        self.round_arrays: ArrayRecord | None = None  # the global arrays of this round (a defence's reference)

    # ------------------------------------------------------------------ the bridge to Hydra
    @classmethod
    def params_from_config(cls, cfg: Any) -> dict[str, Any]:
        """The constructor's keyword arguments from a composed run config (methods add their own fields).
        A key the method's schema does not have (e.g. appended with `+strategy.x=`) is refused, naming it."""
        s, sim, t = cfg.strategy, cfg.sim, cfg.train
        unknown = sorted(set(s.keys()) - set(cls.schema.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"strategy={s.name} has no key(s) {unknown}; its keys are {sorted(cls.schema.__dataclass_fields__)}."
            )
        if ranks.is_mixed(cfg) and not cls.mixed_ranks:
            raise ValueError(
                f"sim.client_ranks={list(sim.client_ranks)} gives clients ranks other than strategy.rank={s.rank}, "
                f"which strategy={s.name} cannot aggregate (it needs one rank everywhere); use a heterogeneous "
                f"method ({', '.join(HETERO_METHODS)}) or sim.client_ranks=null."
            )
        return {
            "num_nodes": int(sim.num_clients),
            "rounds": int(sim.rounds),
            "rank": int(s.rank),
            "alpha": float(s.alpha),
            "lr": float(s.lr),
            "lr_schedule": str(t.lr_schedule),
            "warmup_rounds": int(t.warmup_rounds),
            "lr_min": float(t.lr_min),
            "fraction_train": float(sim.fraction_train),
            "fraction_evaluate": float(sim.fraction_evaluate),
            "min_train_nodes": int(sim.min_train_clients),
            "timeout": float(sim.timeout),
            "seed": int(cfg.seed),
            "robust": RobustAggregation.from_config(cfg),
        }

    @classmethod
    def from_config(cls, cfg: Any, **runtime: Any) -> LoraStrategy:
        """Build from a composed config; `runtime` adds what only the app has (overrides, fixed, server_gradient)."""
        return cls(**cls.params_from_config(cfg), **runtime)

    @classmethod
    def client_level_dp_problem(cls, cfg: Any) -> str | None:
        """Why client-level DP (`privacy=client`) does not cover this method as configured; None: it does."""
        if cls.client_dp_problem is None:
            return RobustAggregation.client_dp_problem(cfg)
        return (
            f"strategy={cfg.strategy.name} does not compose with client-level DP (privacy=client): "
            f"{cls.client_dp_problem}. Use strategy=fedit, ffa_lora or fed_sb, or sample-level DP (privacy=dp)."
        )

    @classmethod
    def client_init_releases(cls, cfg: Any) -> int:
        """Releases of client data a client makes before round 1 (Fed-SB's init); its DP plan reserves them."""
        return 0

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
            "rng": self.sampler.state_dict()["rng"],
            "fixed": dict(self.fixed),
            "accountants": dict(self.accountants),
            "releases": self.releases,
            "robust": self.robust.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.sampler.load_state_dict({"rng": state["rng"]})
        self.fixed = dict(state["fixed"])
        self.accountants = dict(state.get("accountants", {}))
        self.releases = int(state.get("releases", 0))
        self.robust.load_state_dict(state.get("robust", {}))

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
        """Log what this strategy is configured to do, then Flower's summary."""
        log.info(
            "%s: adapter=%s rank=%d alpha=%s client lr=%g (%s, %d warm-up rounds, floor %g); "
            "sampling %.2f of %d clients per round",
            type(self).__name__,
            self.adapter_kind,
            self.rank,
            self.alpha,
            self.lr,
            self.lr_schedule,
            self.warmup_rounds,
            self.lr_min,
            self.fraction_train,
            self.sampler.num_nodes,
        )
        if self.robust.active:  # the default (no defence, no cap) says nothing
            log.info("%s: %s", type(self).__name__, self.robust.describe())
        super().summary()

    def _hello(self) -> ConfigRecord:
        return self.config_record(0, K.PHASE_HELLO)

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
        """The clients' learning rate in (absolute) round `server_round`."""
        return round_lr(
            server_round,
            peak=self.lr,
            total_rounds=self.rounds,
            schedule=self.lr_schedule,
            warmup_rounds=self.warmup_rounds,
            lr_min=self.lr_min,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled client exactly the tensors it needs, and count the bytes.

        Not FedAvg's: that one sends every node the same content; here each node gets its own (Fed-SB's frozen
        A and B the first time, a resumed client's accountant). Entries of `config` (Flower's train config, e.g.
        a DP wrapper's clipping norm) join every message's own.
        """
        server_round += self.round_offset
        self.round_arrays = arrays
        nodes = self.sampler.sample(grid, self.fraction_train, self.min_train_nodes)
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
            pid = self.sampler.partition_of.get(node)
            if self.round_offset and pid in self.accountants:  # resumed: hand the client its accountant back
                content[K.STATE_PRIVACY] = ConfigRecord(self.accountants[pid])
            stats.bytes_down += array_bytes(content)
            stats.floats_down += sum(num_floats(from_record(r)) for r in content.array_records.values())
            msgs.append(Message(content, node, MessageType.TRAIN))
        log.info("round %d: sending to %d clients, %d bytes down", server_round, len(nodes), stats.bytes_down)
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply, aggregate the sound ones with the method's rule (FedAvg's assumes one update rule
        over whole arrays and no declines; `aggregate_arrays` is the method's hook instead)."""
        server_round += self.round_offset
        return self.aggregate_screened(server_round, self.screen(server_round, replies))

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Reply]:
        """The sound training replies of (absolute) round `server_round`, each decoded once (`screening.screen`)."""
        return screen(
            server_round,
            replies,
            expected=self.expected_for,
            stats=self.stats.setdefault(server_round, RoundStats()),
            partition_of=self.sampler.partition_of,
            on_reply=self.keep_accountant,
        )

    def aggregate_screened(
        self, server_round: int, replies: list[Reply]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate screened replies with the method's rule (weights n_k, or 1 with `uniform_weights`)."""
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.floats_up += sum(num_floats(r.state) for r in replies)
        if len(replies) < self.min_train_nodes:
            log.warning(
                "round %d: only %d usable replies (< sim.min_train_clients=%d); the global adapter stays as it was",
                server_round,
                len(replies),
                self.min_train_nodes,
            )
            stats.skipped = True
            stats.round_seconds = time.perf_counter() - stats.started
            return None, None
        good = sorted(replies, key=lambda r: r.partition)  # a fixed order makes float sums reproducible
        claimed = [1.0 if self.uniform_weights else r.metrics[K.NUM_EXAMPLES] for r in good]
        t0 = time.perf_counter()
        kept = self.robust.apply(good, claimed, reference=self.round_arrays, space=self.update_space, stats=stats)
        states, weights = kept.states, kept.weights  # the replies, or what the defence made of them
        agg = self.aggregate_arrays(server_round, states, weights)
        stats.aggregate_seconds = time.perf_counter() - t0
        stats.aggregated = len(kept.replies)
        stats.residual = self.residual(states, weights, agg)
        stats.record_clients([r.metrics for r in kept.replies], kept.client_weights, ranks=self.mixed_ranks)
        stats.round_seconds = time.perf_counter() - stats.started
        return to_record(agg), MetricRecord({K.TRAIN_LOSS: stats.train_loss, K.AGGREGATED: len(kept.replies)})

    def keep_accountant(self, node: int, msg: Message) -> None:
        """Keep a copy of the privacy accountant state a client reports (restored to it after a resume)."""
        if K.STATE_PRIVACY in msg.content.config_records:
            record = msg.content.config_records[K.STATE_PRIVACY]
            self.accountants[self.sampler.partition_of.get(node, node)] = dict(record.items())

    def expected_for(self, node: int) -> Mapping[str, tuple[int, ...]]:
        """The tensor names and shapes `node` must reply with. Default: the global arrays' (one rank for all)."""
        return self.expected

    def residual(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], agg: Mapping[str, torch.Tensor]
    ) -> float:
        """‖Σ p_k B_k A_k − B̄Ā‖ / ‖Σ p_k B_k A_k‖ over all adapted modules (0 = exact)."""
        return aggregation_residual(self.fixed, states, weights, agg)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation on clients' own data when `fraction_evaluate` > 0 (per-node content, as training)."""
        server_round += self.round_offset
        if self.fraction_evaluate == 0.0:
            return []
        msgs = []
        for node in self.sampler.sample(grid, self.fraction_evaluate, 1):
            content = self.arrays_for(node, arrays)
            content[K.CONFIG] = self.config_record(server_round, K.PHASE_EVALUATE)
            msgs.append(Message(content, node, MessageType.EVALUATE))
        return msgs
