"""A node's lifetime privacy budget for its data: one ledger per dataset that composes every run's releases.

A run's accountant (`privacy.policy.AccountantStore`) composes the rounds of one Flower run. A node that trains
in several federations over the same data, or is resumed by a server (a new Flower run), spends one budget over
all of them. The ledger keeps, per run, that run's accountant history — its (σ, q, steps) releases, which are the
mechanism whatever accountant bounded them — and its RDP curve on fixed orders (`LEDGER_ORDERS`). The lifetime ε
is the whole lifetime history (every run's releases, and a task's plan) composed by *one* accountant, the task's:
under PRV the concatenated histories (`ClientAccountant`, PRV composes any list of Poisson-subsampled Gaussian
releases), under RDP the sum of the runs' curves (RDP composes by addition, Mironov 2017, Prop. 1), converted to
(ε, δ) once. So runs planned with different accountants compose soundly: nothing adds ε's of different
accountants, and no run's ε is trusted as given. A task whose *plan* (every release it could make) would take the
lifetime ε past the node's budget is declined before anything is computed from the data.

Node config (``flower-supernode --node-config "... privacy-ledger=tweets privacy-lifetime-epsilon=8"``):
``privacy-ledger`` is a name (the file ``<privacy-state-dir>/ledger-<name>.json``) or a path ending in
``.json``; several federations naming the same ledger share it. ``privacy-lifetime-delta`` fixes δ (default:
the task's δ). The file is written atomically under an exclusive lock, so concurrent runs do not lose entries.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privacy.accountant import DEFAULT_ACCOUNTANT, history_epsilon, merged
from privacy.orders import DEFAULT_ORDERS, History, epsilon_from_curve, rdp_curve

NODE_LEDGER = "privacy-ledger"  # a ledger name (under privacy-state-dir) or a .json path
NODE_LIFETIME_EPSILON = "privacy-lifetime-epsilon"  # the node's ε over every run on this data
NODE_LIFETIME_DELTA = "privacy-lifetime-delta"  # its δ (default: the task's)
LEDGER_KEYS = (NODE_LEDGER, NODE_LIFETIME_EPSILON, NODE_LIFETIME_DELTA)

LEDGER_ORDERS: tuple[float, ...] = (*DEFAULT_ORDERS, 80.0, 128.0, 256.0, 512.0, 1024.0, 4096.0)
"""The orders a ledger keeps RDP at: Opacus' defaults and a few larger ones (small lifetime ε)."""

LEDGER_KIND = "rdp-ledger"


@dataclass(frozen=True)
class LifetimeBudget:
    """A node's lifetime budget: its ledger file, ε and (optionally) δ."""

    path: Path
    epsilon: float
    delta: float | None = None

    @property
    def name(self) -> str:
        return self.path.stem.removeprefix("ledger-")

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any], state_dir: str | None) -> LifetimeBudget | None:
        """The budget the node config declares; None without ``privacy-ledger``. Bad values name the key."""
        raw = str(config.get(NODE_LEDGER) or "")
        if not raw:
            if config.get(NODE_LIFETIME_EPSILON):
                raise ValueError(
                    f"Node config {NODE_LIFETIME_EPSILON} needs {NODE_LEDGER}=<name or path.json> (which data the "
                    "budget is for); e.g. privacy-ledger=tweets privacy-state-dir=/var/lib/fedlora."
                )
            return None
        if raw.endswith(".json") or os.sep in raw:
            path = Path(raw).expanduser()
        elif state_dir:
            path = Path(state_dir).expanduser() / f"ledger-{raw}.json"
        else:
            raise ValueError(
                f"Node config {NODE_LEDGER}={raw!r} is a name: set privacy-state-dir=<folder> for its file, or give "
                f"{NODE_LEDGER} a path ending in .json."
            )
        eps = _positive(config, NODE_LIFETIME_EPSILON, required=True)
        delta = _positive(config, NODE_LIFETIME_DELTA, required=False)
        if delta is not None and not delta < 1:
            raise ValueError(f"Node config {NODE_LIFETIME_DELTA}={delta!r} must be in (0, 1), e.g. 1e-5.")
        assert eps is not None
        return cls(path=path, epsilon=eps, delta=delta)


def _positive(config: Mapping[str, Any], key: str, *, required: bool) -> float | None:
    raw = config.get(key)
    if raw is None or raw == "":
        if required:
            raise ValueError(f"Node config {NODE_LEDGER} needs {key}=<ε over every run>, e.g. {key}=8.")
        return None
    try:
        value = float(str(raw))
    except ValueError:
        raise ValueError(f"Node config {key}={raw!r} is not a number; e.g. {key}=8.") from None
    if not value > 0:
        raise ValueError(f"Node config {key}={raw!r} must be > 0.")
    return value


class PrivacyLedger:
    """The runs that have released something about one dataset, each with its history and RDP curve."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The ledger's state under an exclusive lock; written back atomically when the block ends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                self._write(state)

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"kind": LEDGER_KIND, "orders": list(LEDGER_ORDERS), "runs": {}}
        state = json.loads(self.path.read_text())
        if state.get("kind") != LEDGER_KIND or list(state.get("orders", [])) != list(LEDGER_ORDERS):
            raise ValueError(f"{self.path} is not a privacy ledger of this version (kind {LEDGER_KIND!r}).")
        return dict(state)

    def _write(self, state: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def runs(self) -> dict[str, dict[str, Any]]:
        """The recorded runs by key: ``history`` ([σ, q, steps] entries), ``rdp`` (curve), ``flower_runs``."""
        with self._locked() as state:
            return dict(state["runs"])

    def spent(
        self, delta: float, *, extra: History = (), exclude: str | None = None, accountant: str = DEFAULT_ACCOUNTANT
    ) -> float:
        """Lifetime ε at δ of every run but `exclude`, plus `extra` releases (e.g. a task's whole plan), by
        `accountant` over the whole history, whichever accountant each run was planned with."""
        with self._locked() as state:
            runs = [r for k, r in state["runs"].items() if k != exclude]
        if accountant != "rdp":
            history = [(float(s), float(q), int(n)) for r in runs for s, q, n in r["history"]] + list(extra)
            return history_epsilon(accountant, tuple(merged(history)), delta)
        total = sum((np.asarray(r["rdp"]) for r in runs), np.zeros(len(LEDGER_ORDERS))) + rdp_curve(
            extra, LEDGER_ORDERS
        )
        if not total.any():
            return 0.0
        return epsilon_from_curve(total, LEDGER_ORDERS, delta)[0]

    def record(self, key: str, history: History, *, resumed: bool = False) -> None:
        """Set run `key`'s releases to `history` (its accountant's whole history so far).

        resumed: the server handed this run an accountant from an earlier Flower run (a server-side resume);
        the earlier run whose history this one continues becomes this run, so nothing is counted twice.
        """
        entries = [[float(s), float(q), int(n)] for s, q, n in history]
        with self._locked() as state:
            runs = state["runs"]
            if key not in runs and resumed:
                earlier = [k for k, r in runs.items() if _continues(entries, r["history"])]
                if earlier:
                    old = runs.pop(max(earlier, key=lambda k: sum(n for _, _, n in runs[k]["history"])))
                    runs[key] = {**old, "flower_runs": [*old["flower_runs"], key]}
            run = runs.setdefault(key, {"flower_runs": [key]})
            run["history"] = entries
            run["rdp"] = [float(v) for v in rdp_curve(history, LEDGER_ORDERS)]


def _continues(new: Sequence[Sequence[float]], old: Sequence[Sequence[float]]) -> bool:
    """Whether history `new` starts with history `old` (Opacus merges equal consecutive steps, so the last
    entry of `old` may have grown)."""
    if not old or len(new) < len(old):
        return False
    *head, last = old
    same = all(list(a) == list(b) for a, b in zip(new, head, strict=False))
    tail = new[len(old) - 1]
    return same and tail[0] == last[0] and tail[1] == last[1] and tail[2] >= last[2]


def ledger_decline(
    budget: LifetimeBudget,
    *,
    key: str,
    planned: History,
    delta: float,
    target_epsilon: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> str | None:
    """Why a run `key` whose plan releases `planned` would pass the node's lifetime budget (None: it fits); the
    lifetime history and the plan composed by the task's `accountant` (the one its plan is made with, so a task
    that fits its own target alone fits a fresh ledger of that ε)."""
    ledger = PrivacyLedger(budget.path)
    d = budget.delta if budget.delta is not None else delta
    spent = ledger.spent(d, exclude=key, accountant=accountant)
    total = ledger.spent(d, extra=planned, exclude=key, accountant=accountant)
    if total <= budget.epsilon + 1e-9:
        return None
    left = max(0.0, budget.epsilon - spent) if math.isfinite(spent) else 0.0
    others = len([k for k in ledger.runs() if k != key])
    return (
        f"this node's lifetime budget for its data (ledger {budget.name!r}, {NODE_LIFETIME_EPSILON}="
        f"{budget.epsilon:g} at δ={d:.3g}) has ε={left:.3g} left: ε={spent:.4g} spent over {others} earlier "
        f"run(s), and this task's plan (privacy.target_epsilon={target_epsilon:g}) would take it to ε={total:.4g} "
        f"(every run's releases composed by {accountant})"
    )
