"""A strategy's bridge to Hydra: the keyword arguments its constructor takes, read from a composed config.

Each method declares its schema (`/schema/strategy/<name>`) and what it supports (mixed ranks, client-level DP);
`from_config` checks the config against those declarations and the constructor checks the values, so
`fl.app.config.compose` fails on a bad field before any client trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from fl import ranks
from fl.checks import require
from fl.config import StrategyConfig
from fl.config_defence import defence_fields
from strategies.averaging import ModelAverage
from strategies.robust import RobustAggregation
from strategies.scaffold import make_scaffold
from strategies.server_opt import make_server_optimizer

HETERO_METHODS = ("flora", "flexlora", "hetlora")
"""The registered methods that take mixed client ranks (named in the refusal of the others)."""


class ConfigBridge:
    """Class-level declarations of a method and the classmethods that read its fields from a run config."""

    title: ClassVar[str] = ""
    """The method's name in reports, tables and plots (e.g. ``FFA-LoRA``); the class name when empty."""
    adapter_kind: ClassVar[str] = "lora"
    """The adapter every party builds for this method (`fl.adapters.build_adapter`)."""
    schema: ClassVar[type[StrategyConfig]] = StrategyConfig
    """The method's Hydra schema (`/schema/strategy/<name>`): its fields and their types."""
    client_dp_problem: ClassVar[str | None] = None
    """Why this method's release is not covered by client-level DP (`strategies.client_dp`); None: it is."""
    mixed_ranks: ClassVar[bool] = False
    """Whether clients may train at ranks of their own (`sim.client_ranks`, node config `lora-rank`; `fl.ranks`)."""

    server_opt_problem: ClassVar[str | None] = None
    """Why a server optimizer (`server_opt=`) is not defined for this method; None: it steps `optimizer_view`."""

    average_problem: ClassVar[str | None] = None
    """Why the mean of the rounds' global arrays (`server_opt.average_from`, `strategies.averaging`) is not a model
    of this method; None: it is."""

    scaffold_problem: ClassVar[str | None] = None
    """Why SCAFFOLD (`drift=scaffold`) is not defined for this method; mixed-rank methods and methods with
    personal tensors are refused without it (`strategies.scaffold.scaffold_problem`)."""
    personal_suffixes: ClassVar[tuple[str, ...]] = ()
    """Name suffixes of tensors each client keeps as its own and is never sent (FedSA-LoRA's B)."""

    update_space: ClassVar[str] = "factors"
    """Where a client's update lives for a defence (`strategies.robust_math`): factors | product (B_k·A_k)."""

    @classmethod
    def describe(cls, fields: Mapping[str, Any]) -> str:
        """The method as a report's row names it, from its `strategy.*` fields (a method adds what tells its
        runs apart, e.g. Fed-SB its rank and init)."""
        return cls.title or cls.__name__

    @classmethod
    def params_from_config(cls, cfg: Any) -> dict[str, Any]:
        """The constructor's keyword arguments from a composed run config (methods add their own fields).
        A key the method's schema does not have (e.g. appended with `+strategy.x=`) is refused, naming it."""
        s, sim, t = cfg.strategy, cfg.sim, cfg.train
        known = set(cls.schema.__dataclass_fields__) | defence_fields()  # the defences' fields join every method's
        unknown = sorted(set(s.keys()) - known)
        if unknown:
            raise ValueError(f"strategy={s.name} has no key(s) {unknown}; its keys are {sorted(known)}.")
        if ranks.is_mixed(cfg) and not cls.mixed_ranks:
            raise ValueError(
                f"sim.client_ranks={list(sim.client_ranks)} gives clients ranks other than strategy.rank={s.rank}, "
                f"which strategy={s.name} cannot aggregate (it needs one rank everywhere); use a heterogeneous "
                f"method ({', '.join(HETERO_METHODS)}) or sim.client_ranks=null."
            )
        if cfg.server_opt.name != "none" and cls.server_opt_problem is not None:
            raise ValueError(
                f"server_opt={cfg.server_opt.name} does not compose with strategy={s.name}: {cls.server_opt_problem}. "
                "Use server_opt=none with this method."
            )
        average_from = int(cfg.server_opt.average_from)
        if average_from and cls.average_problem is not None:
            raise ValueError(
                f"server_opt.average_from={average_from} does not compose with strategy={s.name}: "
                f"{cls.average_problem}. Use server_opt.average_from=0 with this method."
            )
        sampling = str(sim.client_sampling)
        samplers = "use uniform (a fresh seeded draw each round) or cyclic (a seeded permutation, k clients a round)."
        require(sampling in ("uniform", "cyclic"), "sim.client_sampling", sampling, samplers)
        if sampling == "cyclic" and cfg.privacy.client.enabled:
            raise ValueError(
                "sim.client_sampling=cyclic does not compose with client-level DP (privacy=client): its ε counts on "
                "the amplification of a random draw of the clients each round, which a cycle is not. Use "
                "sim.client_sampling=uniform."
            )
        if average_from > int(sim.rounds):
            raise ValueError(
                f"server_opt.average_from={average_from} is after the last round (sim.rounds={sim.rounds}): no "
                "global would join the mean. Use a round <= sim.rounds, or 0 (off)."
            )
        return {
            "server_opt": make_server_optimizer(cfg),
            "average": ModelAverage(average_from, int(cfg.server_opt.average_window)),
            "scaffold": make_scaffold(cfg, cls),
            "num_nodes": int(sim.num_clients),
            "rounds": int(sim.rounds),
            "rank": int(s.rank),
            "alpha": float(s.alpha),
            "lr": float(s.lr),
            "lr_schedule": str(t.lr_schedule),
            "warmup_rounds": int(t.warmup_rounds),
            "lr_min": float(t.lr_min),
            "fraction_train": float(sim.fraction_train),
            "client_sampling": sampling,
            "fraction_evaluate": float(sim.fraction_evaluate),
            "min_train_nodes": int(sim.min_train_clients),
            "timeout": float(sim.timeout),
            "seed": int(cfg.seed),
            "robust": RobustAggregation.from_config(cfg),
        }

    @classmethod
    def from_config(cls, cfg: Any, **runtime: Any) -> Self:
        """Build from a composed config; `runtime` adds what only the app has (overrides, fixed, server_gradient)."""
        return cls(**cls.params_from_config(cfg), **runtime)

    @classmethod
    def client_level_dp_problem(cls, cfg: Any) -> str | None:
        """Why client-level DP (`privacy=client`) does not cover this method as configured; None: it does."""
        if str(cfg.drift.name) == "scaffold":
            return (
                "drift=scaffold does not compose with client-level DP (privacy=client): each reply's Δc_i = "
                "(x − y_i)/(K·η) − c is the client's whole update, rescaled, sent beside the clipped arrays without "
                "clip or noise. Use drift=fedprox or drift=none, or sample-level DP (privacy=dp)."
            )
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
