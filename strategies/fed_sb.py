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
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl import constants as K
from fl.adapters import A_SUFFIX, SB_B_SUFFIX, SB_R_SUFFIX
from fl.config import FED_SB_INITS
from fl.wire import array_bytes, from_record, num_floats, to_record
from strategies.base import LoraStrategy, RoundStats, scalars
from strategies.lora_math import fedsb_init_factors
from strategies.sketch_math import range_finder, sketch_factors, sketch_width
from strategies.validation import reply_problem

log = logging.getLogger(__name__)

BASE_SUFFIX = ".base_layer.weight"  # the frozen W0 inside a PEFT LoRA layer


class FedSB(LoraStrategy):
    """Fed-SB (https://arxiv.org/abs/2502.15436): average only R; A and B sent once per client."""

    adapter_kind: ClassVar[str] = "fedsb"

    def __init__(self, cfg: Any, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.has_frozen: set[int] = set()  # nodes that hold the current A and B

    def prepare(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """Initialise A, B, R0 as `strategy.init` says (see the module docstring); round 0 holds its traffic."""
        s = self.cfg.strategy
        mode = str(s.init)
        if mode == "random":
            return arrays
        if mode not in FED_SB_INITS:
            raise ValueError(f"strategy.init={mode!r} is unknown; use one of {list(FED_SB_INITS)}.")
        stats = self.stats.setdefault(0, RoundStats())
        rank, lr = int(s.rank), float(s.init_lr)
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
                    n: sketch_width(*shape, rank=rank, oversample=int(s.sketch_oversample))
                    for n, shape in shapes.items()
                }
                y = init.run(K.INIT_STEP_RIGHT, None, expected={n: (shapes[n][0], width[n]) for n in shapes})
                basis, projection = range_finder(
                    y,
                    left=lambda q: init.run(K.INIT_STEP_LEFT, q, expected={n: (shapes[n][1], width[n]) for n in q}),
                    right=lambda w: init.run(K.INIT_STEP_RIGHT, w, expected={n: (shapes[n][0], width[n]) for n in w}),
                    power_iters=int(s.sketch_power_iters),
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
        s = self.cfg.strategy
        log.info(
            "Fed-SB init=%s (init_fraction %.2f, sketch p=%d, power iterations %d)",
            s.init,
            float(s.init_fraction),
            int(s.sketch_oversample),
            int(s.sketch_power_iters),
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
        """The clients that contribute to a federated init: a seeded `strategy.init_fraction` of them.

        Drawn from a generator of its own, so round sampling is the same whatever the init does.
        """
        self.wait_for_nodes(grid)
        self.discover(grid)
        known = sorted(self.partition_of, key=self.partition_of.__getitem__)
        k = min(len(known), max(1, round(float(self.cfg.strategy.init_fraction) * len(known))))
        picks = np.random.default_rng(int(self.cfg.seed) + 29).choice(len(known), size=k, replace=False)
        return [known[i] for i in sorted(picks)]

    def _server_gradient(self) -> dict[str, torch.Tensor]:
        """init=server: the gradient sum on the server's own `strategy.init_data` (no client bytes)."""
        from clients.fedsb_init import gradient_sum, server_init_data
        from fl.workspace import get_workspace

        ws = get_workspace(self.overrides)
        data = server_init_data(self.cfg, ws)
        log.info("Fed-SB init=server: gradient on %d examples of %s", len(data), self.cfg.strategy.init_data)
        return gradient_sum(ws.model, data, batch_size=int(self.cfg.train.batch_size), pad_id=ws.pad_id)

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """R and the head every round; the frozen A and B too the first time a node is sent work."""
        content = RecordDict({K.ARRAYS: arrays})
        if node_id not in self.has_frozen:
            content[K.FROZEN] = to_record(self.fixed)
            self.has_frozen.add(node_id)
        return content

    def screen(self, server_round: int, replies: Any) -> list[Message]:
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
        for reply in self.grid.send_and_receive(msgs, timeout=float(strategy.cfg.sim.timeout)):
            node = reply.metadata.src_node_id
            if reply.has_error():
                st.failed += 1
                log.warning("Fed-SB init (%s): node %d failed: %s; going on without it", step, node, reply.error.reason)
                continue
            st.bytes_up += array_bytes(reply.content)
            strategy.keep_accountant(node, reply)
            problem = reply_problem(reply, expected=expected, server_round=0)
            if problem is not None:
                st.rejected += 1
                log.warning("Fed-SB init (%s): node %d's reply rejected (%s); going on without it", step, node, problem)
                continue
            reported = scalars(reply.content.metric_records[K.METRICS])
            if K.EPSILON in reported:
                eps[node] = reported[K.EPSILON]
            release = from_record(reply.content.array_records[K.ARRAYS])
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
