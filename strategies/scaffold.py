"""SCAFFOLD's server side (`drift=scaffold`): the control variate c, sent with every training message and updated
from the clients' Δc_i.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, https://arxiv.org/abs/1910.06378 (Algorithm 1, option II). With N = `sim.num_clients` and S the clients
whose replies passed screening this round,

    c ← c + (1/N) · Σ_{i∈S} Δc_i,

so c stays the mean of all N clients' c_i (each starts at zero). c lives in the trained space: the tensors a client
trains and replies with, by name (the global arrays: FedIT's A, B and head; FFA-LoRA's B and head; Fed-SB's R and
head). The client's half (its c_i, the corrected step, Δc_i) is `clients.drift`. The model's own update is the
method's rule followed by `server_opt=` (Reddi et al.'s η_g; `none` is the paper's η_g = 1).

Server state (`state_dict`, checkpointed): c, and each client's c_i as the sum of the Δc_i it sent — the same float32
additions the client does, so after a resume (whose clients start with an empty `Context.state`) the first message
to each client carries its c_i back (`K.SCAFFOLD_CLIENT`) and the run continues where it stopped. Under sample-level
DP, Δc_i is computed from the DP-trained model (post-processing), so keeping it costs no ε.

Bytes: c goes down with every training message (one float per trained coordinate) and Δc_i comes up with every
reply; both are ArrayRecords of the messages, so the round's `bytes_down`/`bytes_up` (and `floats_*`) count them.

Methods whose trained tensors are not one space across rounds or clients are refused at compose (`make_scaffold`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from fl import constants as K
from fl.wire import num_floats, to_record
from strategies.screening import Reply
from strategies.stats import RoundStats

STATE_TYPE = "fedlora-scaffold"


class ScaffoldServer:
    """The server's control variate c and its copy of each client's c_i.

    Parameters
    ----------
    num_clients : int
        N, the clients in the federation (`sim.num_clients`): c is the mean of their c_i.
    enabled : bool
        False (`drift=none|fedprox`): nothing is sent, read or kept.
    """

    def __init__(self, *, num_clients: int, enabled: bool = True) -> None:
        if num_clients < 1:
            raise ValueError(f"sim.num_clients={num_clients} is invalid for SCAFFOLD: it needs at least one client.")
        self.num_clients, self.enabled = num_clients, enabled
        self.c: dict[str, torch.Tensor] = {}  # float32, by trained-tensor name
        self.clients: dict[int, dict[str, torch.Tensor]] = {}  # partition -> c_i (Σ of its Δc_i), float32
        self.handed: set[int] = set()  # partitions sent their c_i since this process resumed (not saved)
        self._record: ArrayRecord | None = None  # c encoded once per update

    @property
    def active(self) -> bool:
        """Whether SCAFFOLD runs (`drift=scaffold`)."""
        return self.enabled

    def describe(self) -> str:
        """One line for the strategy's summary."""
        return f"drift=scaffold (option II, c over {len(self.c)} tensors, N={self.num_clients})"

    def begin(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """c = 0 on the trained tensors' names and shapes (kept as loaded after a resume)."""
        if self.active and not self.c:
            self.c = {n: torch.zeros(s, dtype=torch.float32) for n, s in shapes.items()}

    def reply_records(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """The extra ArrayRecord a sound training reply must carry, with its names and shapes (`screening.screen`)."""
        return {K.SCAFFOLD_DELTA: {n: tuple(t.shape) for n, t in self.c.items()}} if self.active else {}

    def attach(self, content: RecordDict, partition: int | None, *, resumed: bool) -> None:
        """Add c to a training message; after a resume, the client's own c_i too, the first time it is sent work."""
        if not self.active:
            return
        if self._record is None:
            self._record = to_record(self.c)
        content[K.SCAFFOLD_C] = self._record
        if resumed and partition is not None and partition in self.clients and partition not in self.handed:
            content[K.SCAFFOLD_CLIENT] = to_record(self.clients[partition])
            self.handed.add(partition)

    def absorb(self, replies: Iterable[Reply], stats: RoundStats) -> None:
        """c ← c + (1/N)·Σ Δc_i over the screened replies (in partition order), and each sender's c_i ← c_i + Δc_i."""
        if not self.active:
            return
        deltas = [(r.partition, r.records[K.SCAFFOLD_DELTA]) for r in sorted(replies, key=lambda r: r.partition)]
        if not deltas:
            return
        for partition, delta in deltas:
            own = self.clients.get(partition) or {n: torch.zeros_like(t) for n, t in self.c.items()}
            self.clients[partition] = {n: own[n] + delta[n].float() for n in self.c}
            stats.floats_up += num_floats(delta)
        for name, c in self.c.items():
            total = torch.stack([d[name].double() for _, d in deltas]).sum(dim=0)
            self.c[name] = (c.double() + total / self.num_clients).float()
        self._record = None
        stats.extra[K.SCAFFOLD_C_NORM] = float(sum(float(t.double().pow(2).sum()) for t in self.c.values()) ** 0.5)

    def state_dict(self) -> dict[str, Any]:
        """c and the clients' c_i, tagged (a checkpoint of another kind is refused)."""
        if not self.active:
            return {}
        return {"type": STATE_TYPE, "c": dict(self.c), "clients": {p: dict(c) for p, c in self.clients.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; an empty state (drift other than scaffold, or an older checkpoint) starts at zero."""
        if not state or not self.active:
            return
        if state.get("type") != STATE_TYPE:
            raise ValueError(f"The checkpoint's SCAFFOLD state has type {state.get('type')!r}, not {STATE_TYPE!r}.")
        self.c = dict(state["c"])
        self.clients = {int(p): dict(c) for p, c in state["clients"].items()}
        self._record = None


def scaffold_problem(cfg: Any, method: Any) -> str | None:
    """Why `drift=scaffold` does not compose with this run's method (a `ConfigBridge` class) and config; None: it
    does. Control variates need one trained space, shared by the server and every client, across rounds."""
    if method.scaffold_problem is not None:
        return str(method.scaffold_problem)
    if method.mixed_ranks:
        return (
            "the server re-forms the clients' factors every round (stacked, SVD-truncated or rank-padded, at each "
            "client's own rank), so the tensors a client trains are not one space that c and c_i could stay in"
        )
    if method.personal_suffixes:
        return (
            f"each client keeps its own {', '.join(method.personal_suffixes)} tensors, which the server never sends, "
            "so c's mean over the clients' c_i would correct towards tensors no client trains from"
        )
    if str(cfg.strategy.defence) != "none":
        return (
            f"with strategy.defence={cfg.strategy.defence} a hostile client's Δc_i would still enter c, which every "
            "client adds to each step, past the defence; use strategy.defence=none"
        )
    return None


def make_scaffold(cfg: Any, method: Any) -> ScaffoldServer:
    """The SCAFFOLD server state of a composed config (inactive unless `drift=scaffold`); refuses a method it does
    not compose with, naming both keys and the reason."""
    enabled = str(cfg.drift.name) == "scaffold"
    problem = scaffold_problem(cfg, method) if enabled else None
    if problem is not None:
        raise ValueError(
            f"drift=scaffold does not compose with strategy={cfg.strategy.name}: {problem}. "
            "Use drift=fedprox or drift=none with this method."
        )
    return ScaffoldServer(num_clients=int(cfg.sim.num_clients), enabled=enabled)
