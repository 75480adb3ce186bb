"""Fed-SB: frozen A and B shared by all, only the r × r matrix R trains and is averaged.

Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in
(Private) Federated LoRA Fine-Tuning", 2025, https://arxiv.org/abs/2502.15436 (code: CERT-Lab/fed-sb;
builds on LoRA-SB).

W = W0 + B·R·A with A (r × d_in) and B (d_out × r) frozen, scaling 1. Update rule: R̄ = Σ_k p_k R_k;
exact, because B·R̄·A = Σ_k p_k B·R_k·A. Uplink r² per module, independent of the width.

Initialisation, once before round 1 (`strategy.init`; round 0 of metrics.jsonl holds all its traffic):

- `federated` (the paper's): each client sends the dense gradient sum G_k of the loss w.r.t. every adapted
  W0 over `strategy.init_examples` of its examples (d_out·d_in floats per module); the server sums
  G = Σ_k G_k, takes G̃ = −η·sign(G) (η = `strategy.init_lr`) and factorises G̃ ≈ B·R0·A by a truncated
  SVD (`lora_math.fedsb_init_factors`), so the model starts at W0 + trunc_r(G̃).
- `sketch` (ours): the rank-r part of G from a federated randomized range finder (Halko, Martinsson &
  Tropp 2011; `sketch_math`): Y_k = G_k·Ω with Ω from the seed, Q = qr(Σ Y_k), then Qᵀ·G_k; (r+p)(d_in+d_out)
  floats per module per client, 2 + 2·`sketch_power_iters` exchanges. It factorises −c·G (c matches the
  dense init's RMS entry η), not −η·sign(G): sign(G) needs the dense G.
- `server`: the server's own gradient on `strategy.init_data` (the authors' pooled-data setting), then
  as `federated`; no client bytes.
- `random`: random orthonormal A, B and R = 0.

Only a seeded `strategy.init_fraction` of the clients takes part in a federated init. A and B go to each
client once, the first time it is sampled, counted in that round's bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl import constants as K
from fl.adapters import A_SUFFIX, BASE_SUFFIX, SB_B_SUFFIX, SB_R_SUFFIX
from fl.checks import require
from fl.config import StrategyConfig
from fl.wire import array_bytes, from_record, num_floats, to_record
from strategies.base import LoraStrategy
from strategies.lora_math import fedsb_init_factors
from strategies.screening import Reply, check_reply
from strategies.sketch_math import range_finder, sketch_factors, sketch_width
from strategies.stats import RoundStats, scalars

log = logging.getLogger(__name__)

INITS = ("federated", "sketch", "server", "random")
CLIENT_INITS = ("federated", "sketch")  # inits that release client gradients before round 1
PUBLIC = "public"  # strategy.init_data=public: the run's data.public_size slice


@dataclass
class FedSBConfig(StrategyConfig):
    """Fed-SB's fields (`strategy=fed_sb`)."""

    init: str = "federated"  # federated (dense gradients) | sketch (randomized range finder) | server | random
    init_examples: int = 64  # per client, for the federated init gradient
    init_lr: float = 1e-3  # eta of the first full fine-tuning step the init approximates
    init_fraction: float = 1.0  # fraction of clients (seeded sample) that contribute to a federated init
    init_data: str | None = None  # init=server: the server's own CSV/JSON/JSONL/Parquet file, or public
    sketch_oversample: int = 8  # init=sketch: p, the sketch has r + p columns per module
    sketch_power_iters: int = 0  # init=sketch: power iterations (two more exchanges each)


class FedSB(LoraStrategy):
    """Fed-SB (https://arxiv.org/abs/2502.15436): average only R; A and B sent once per client.

    Parameters
    ----------
    init : {"federated", "sketch", "server", "random"}
        How A, B and R0 are found before round 1 (module docstring).
    init_examples, init_lr, init_fraction
        Examples per client for the init gradient, η of the first step it approximates, the seeded share of
        clients that send one.
    init_data : str, optional
        init=server: the server's own data (a file, or ``public``); the app turns it into `server_gradient`.
    sketch_oversample, sketch_power_iters : int
        init=sketch: p (the sketch has r + p columns) and power iterations (two more exchanges each).
    **kwargs
        `LoraStrategy`'s arguments.
    """

    title: ClassVar[str] = "Fed-SB"
    adapter_kind: ClassVar[str] = "fedsb"
    update_space: ClassVar[str] = "factors"  # the trained factor is the whole update (strategies.defences)
    schema: ClassVar[type[StrategyConfig]] = FedSBConfig

    @classmethod
    def describe(cls, fields: Mapping[str, Any]) -> str:
        """``Fed-SB r=32 (sketch init)``: the rank and the init decide Fed-SB's accuracy and round-0 uplink."""
        init = fields.get("init") or "federated"
        label = f"{cls.title} r={fields.get('rank')} ({init} init)"
        if float(fields.get("init_fraction") or 1.0) < 1.0:
            label += f" x{fields['init_fraction']}"
        if init == "sketch" and int(fields.get("sketch_power_iters") or 0):
            label += f" q={fields['sketch_power_iters']}"
        return label

    def __init__(
        self,
        *,
        init: str = "federated",
        init_examples: int = 64,
        init_lr: float = 1e-3,
        init_fraction: float = 1.0,
        init_data: str | None = None,
        sketch_oversample: int = 8,
        sketch_power_iters: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require(init in INITS, "strategy.init", init, f"use one of {list(INITS)}.")
        require(init_examples >= 1, "strategy.init_examples", init_examples, "use at least 1 example.")
        require(init_lr > 0, "strategy.init_lr", init_lr, "the init step size eta must be > 0.")
        require(
            0 < init_fraction <= 1,
            "strategy.init_fraction",
            init_fraction,
            "use a fraction in (0, 1] of the clients that send an init gradient or sketch.",
        )
        require(sketch_oversample >= 0, "strategy.sketch_oversample", sketch_oversample, "use p >= 0 (e.g. 8).")
        require(sketch_power_iters >= 0, "strategy.sketch_power_iters", sketch_power_iters, "use 0 or more.")
        require(
            init != "server" or bool(init_data),
            "strategy.init_data",
            init_data,
            "strategy.init=server needs the server's own data: set strategy.init_data=PATH "
            "(CSV/JSON/JSONL/Parquet with data.text_column and data.label_column), or public with data.public_size.",
        )
        self.init, self.init_examples, self.init_lr, self.init_fraction = init, init_examples, init_lr, init_fraction
        self.init_data, self.sketch_oversample, self.sketch_power_iters = (
            init_data,
            sketch_oversample,
            sketch_power_iters,
        )
        self.has_frozen: set[int] = set()  # nodes that hold the current A and B

    @classmethod
    def params_from_config(cls, cfg: Any) -> dict[str, Any]:
        """The base's arguments plus the init's; `init_data=public` needs the run's public slice."""
        s = cfg.strategy
        require(
            s.init_data != PUBLIC or cfg.data.public_size > 0,
            "strategy.init_data",
            PUBLIC,
            "the run has no public slice: set data.public_size (e.g. 640), or give a file as strategy.init_data=PATH.",
        )
        init = {
            "init": str(s.init),
            "init_examples": int(s.init_examples),
            "init_lr": float(s.init_lr),
            "init_fraction": float(s.init_fraction),
            "init_data": None if s.init_data is None else str(s.init_data),
            "sketch_oversample": int(s.sketch_oversample),
            "sketch_power_iters": int(s.sketch_power_iters),
        }
        return {**super().params_from_config(cfg), **init}

    @classmethod
    def client_level_dp_problem(cls, cfg: Any) -> str | None:
        """A federated or sketched init releases client gradients before round 1: not covered."""
        if cfg.strategy.init in CLIENT_INITS:
            return (
                f"strategy.init={cfg.strategy.init!r} is invalid: Fed-SB's federated/sketched init sends each "
                "client's dense gradient (or its sketch) before round 1, which client-level DP does not cover; use "
                "strategy.init=random or strategy.init=server under privacy=client."
            )
        return super().client_level_dp_problem(cfg)

    @classmethod
    def client_init_releases(cls, cfg: Any) -> int:
        """1 for the dense federated init; 2 + 2·`sketch_power_iters` for the sketched one (Y = G·Ω and Qᵀ·G,
        plus Gᵀ·Q and G·W per power iteration); 0 for server or random. A client outside `init_fraction` spends
        nothing, but its plan reserves the releases anyway."""
        if cfg.strategy.init == "federated":
            return 1
        if cfg.strategy.init == "sketch":
            return 2 + 2 * int(cfg.strategy.sketch_power_iters)
        return 0

    def prepare(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """Initialise A, B, R0 as `init` says (see the module docstring); round 0 holds its traffic."""
        mode = self.init
        if mode == "random":
            return arrays
        stats = self.stats.setdefault(0, RoundStats())
        rank, lr = self.rank, self.init_lr
        shapes = self._module_shapes()
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if mode == "server":
            grads = self._server_gradient()
            factors = {n: fedsb_init_factors(grads[n].float(), rank=rank, lr=lr) for n in shapes}
        else:
            init = _InitExchange(self, grid, self._init_nodes(grid), stats)
            if mode == "federated":
                grads = init.run(K.INIT_STEP_DENSE, None, expected=shapes)
                factors = {n: fedsb_init_factors(grads[n].float(), rank=rank, lr=lr) for n in shapes}
            else:
                width = {
                    n: sketch_width(*shape, rank=rank, oversample=self.sketch_oversample) for n, shape in shapes.items()
                }
                y = init.run(K.INIT_STEP_RIGHT, None, expected={n: (shapes[n][0], width[n]) for n in shapes})
                basis, projection = range_finder(
                    y,
                    left=lambda q: init.run(K.INIT_STEP_LEFT, q, expected={n: (shapes[n][1], width[n]) for n in q}),
                    right=lambda w: init.run(K.INIT_STEP_RIGHT, w, expected={n: (shapes[n][0], width[n]) for n in w}),
                    power_iters=self.sketch_power_iters,
                )
                factors = {n: sketch_factors(basis[n], projection[n], rank=rank, lr=lr) for n in shapes}
            stats.extra["init_clients"] = len(init.nodes)
            stats.extra["init_exchanges"] = init.exchange
            if init.eps:  # the privatised init releases' cost, per client
                stats.extra["epsilon_max"], stats.extra["epsilon_mean"] = max(init.eps), sum(init.eps) / len(init.eps)
        state = from_record(arrays)
        fixed: dict[str, torch.Tensor] = {}
        for name, (a, b, r0) in factors.items():
            prefix = name[: -len(BASE_SUFFIX)]
            fixed[prefix + A_SUFFIX], fixed[prefix + SB_B_SUFFIX] = a, b
            state[prefix + SB_R_SUFFIX] = r0
        self.fixed = fixed
        log.info("Fed-SB init=%s: A, B, R0 for %d modules (%d bytes up)", mode, len(factors), stats.bytes_up)
        return to_record(state)

    def summary(self) -> None:
        """Log the init mode as well as the base summary."""
        log.info(
            "Fed-SB init=%s (init_fraction %.2f, sketch p=%d, power iterations %d)",
            self.init,
            self.init_fraction,
            self.sketch_oversample,
            self.sketch_power_iters,
        )
        super().summary()

    def _module_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted W0, by its base-weight name (from the frozen A and B)."""
        shapes = {}
        for key, a in self.fixed.items():
            if key.endswith(A_SUFFIX):
                prefix = key[: -len(A_SUFFIX)]
                shapes[prefix + BASE_SUFFIX] = (int(self.fixed[prefix + SB_B_SUFFIX].shape[0]), int(a.shape[1]))
        return shapes

    def _init_nodes(self, grid: Grid) -> list[int]:
        """The clients that contribute to a federated init: a seeded `init_fraction` of them, drawn from a
        generator of its own, so round sampling is the same whatever the init does."""
        return self.sampler.subset(grid, self.init_fraction, salt=29)

    def _server_gradient(self) -> dict[str, torch.Tensor]:
        """init=server: the gradient sum on the server's own `init_data` (no client bytes), from the app."""
        if self.server_gradient is None:
            raise ValueError("strategy.init=server needs the server's gradient; the app did not provide one.")
        return self.server_gradient()

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """R and the head every round; the frozen A and B too the first time a node is sent work."""
        content = RecordDict({K.ARRAYS: arrays})
        if node_id not in self.has_frozen:
            content[K.FROZEN] = to_record(self.fixed)
            self.has_frozen.add(node_id)
        return content

    def screen(self, server_round: int, replies: Any) -> list[Reply]:
        """As the base; a node whose reply failed is sent A and B again next time."""
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                self.has_frozen.discard(msg.metadata.src_node_id)
        return super().screen(server_round, replies)

    def materialize(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """R and the head from `arrays`, A and B from the server's state."""
        return {**self.fixed, **from_record(arrays)}


class _InitExchange:
    """One federated init protocol: each `run` sends the same clients one request and sums their replies.

    A client whose reply fails or is rejected (wrong names or shapes, NaN/Inf) drops out of the later
    exchanges; the sums go on with the others (their basis Q is still orthonormal), and the init fails
    with a clear error only when no client is left.
    """

    def __init__(self, strategy: FedSB, grid: Grid, nodes: list[int], stats: RoundStats) -> None:
        self.strategy, self.grid, self.nodes, self.stats = strategy, grid, list(nodes), stats
        self.exchange = 0
        self.eps: list[float] = []
        stats.sampled = len(nodes)

    def run(
        self, step: str, mats: dict[str, torch.Tensor] | None, *, expected: dict[str, tuple[int, int]]
    ) -> dict[str, torch.Tensor]:
        """Σ over the remaining clients of their `step` release (float64), by module."""
        st, strategy = self.stats, self.strategy
        msgs = []
        for node in self.nodes:
            conf = strategy.config_record(0, K.PHASE_INIT_GRAD)
            conf[K.INIT_STEP], conf[K.INIT_EXCHANGE] = step, self.exchange
            content = RecordDict({K.CONFIG: conf})
            if mats is not None:
                content[K.ARRAYS] = to_record({n: m.float() for n, m in mats.items()})
                st.bytes_down += array_bytes(content)
                st.floats_down += num_floats(mats)
            msgs.append(Message(content, node, MessageType.TRAIN))
        sums: dict[str, torch.Tensor] = {}
        good: list[int] = []
        eps: dict[int, float] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=strategy.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                st.fail(strategy.sampler.partition_of.get(node, node), reply.error.reason)
                log.warning("Fed-SB init (%s): node %d failed: %s; going on without it", step, node, reply.error.reason)
                continue
            st.bytes_up += array_bytes(reply.content)
            strategy.accountants.keep(strategy.sampler.partition_of, node, reply)
            problem, release = check_reply(reply, expected=expected, server_round=0)
            if problem is not None or release is None:
                st.rejected += 1
                log.warning("Fed-SB init (%s): node %d's reply rejected (%s); going on without it", step, node, problem)
                continue
            reported = scalars(reply.content.metric_records[K.METRICS])
            if K.EPSILON in reported:
                eps[node] = reported[K.EPSILON]
            st.floats_up += num_floats(release)
            for name, t in release.items():
                sums[name] = sums[name] + t.double() if name in sums else t.double()
            good.append(node)
        self.exchange += 1
        self.nodes = [n for n in self.nodes if n in set(good)]
        self.eps = list(eps.values()) or self.eps
        if not self.nodes:
            raise RuntimeError(
                f"Fed-SB init: no client sent a usable {step!r} reply (exchange {self.exchange}); cannot start. "
                "See the warnings above, or use strategy.init=random."
            )
        return sums
