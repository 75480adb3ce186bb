"""The node's own privacy policy: the least protection it accepts, and its accountant kept on its own disk.

Sample-level DP protects a client's examples *from the server*, so the server cannot be the one that sets it:
its overrides arrive with every message and could say ``privacy=off``, a larger ε, or hand back a fresh
accountant. A node declares its floor in its node config (``flower-supernode --node-config "... privacy-epsilon=3
privacy-delta=1e-5 privacy-max-grad-norm=1.0 privacy-state-dir=/var/lib/fedlora"``); `NodePolicy.check` turns
a task that would give less into a reason to decline, and `AccountantStore` keeps the node's accountant in a
per-run file so that a SuperNode restart keeps composing and no copy from the server can lower the record.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl import constants as K
from privacy.accountant import ClientAccountant

NODE_EPSILON = "privacy-epsilon"  # the largest ε (sample-level, whole run) the node accepts
NODE_DELTA = "privacy-delta"  # the largest δ
NODE_MAX_GRAD_NORM = "privacy-max-grad-norm"  # the largest per-example clipping bound C
NODE_STATE_DIR = "privacy-state-dir"  # a node-local folder for the accountant (node config only)
POLICY_KEYS = (NODE_EPSILON, NODE_DELTA, NODE_MAX_GRAD_NORM)

DECLINE_RECORD = K.DECLINE_RECORD  # ConfigRecord in a declined reply
DECLINE_REASON = K.DECLINE_REASON  # its text field


@dataclass(frozen=True)
class NodePolicy:
    """The least protection a node accepts; any field None puts no bound on that quantity.

    A policy with any bound requires DP: ``privacy=off`` is declined. σ is not a field: the node plans σ
    itself from the (ε, δ) it accepted, and its own accountant stops it at that ε.
    """

    epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float | None = None

    @property
    def requires_dp(self) -> bool:
        return any(v is not None for v in (self.epsilon, self.delta, self.max_grad_norm))

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> NodePolicy:
        """From node-config style keys (`POLICY_KEYS`); values as numbers or strings."""
        values: dict[str, float | None] = {}
        for key, name in zip(POLICY_KEYS, ("epsilon", "delta", "max_grad_norm"), strict=True):
            raw = config.get(key)
            if raw is None or raw == "":
                values[name] = None
                continue
            try:
                value = float(str(raw))
            except ValueError:
                raise ValueError(f"Node config {key}={raw!r} is not a number; e.g. {key}=3.0.") from None
            if not value > 0 or (key == NODE_DELTA and not value < 1):
                raise ValueError(f"Node config {key}={raw!r} is out of range: ε, C > 0 and 0 < δ < 1.")
            values[name] = value
        return cls(**values)

    def check(
        self, *, enabled: bool, target_epsilon: float, delta: float, max_grad_norm: float, poisson_sampling: bool
    ) -> str | None:
        """Why a task with these (resolved) DP settings gives less protection than this policy; None if it does not."""
        if not self.requires_dp:
            return None
        if not enabled:
            return f"this node requires DP ({self.describe()}) but the task has privacy.enabled=false"
        if self.epsilon is not None and target_epsilon > self.epsilon:
            return f"privacy.target_epsilon={target_epsilon:g} exceeds this node's {NODE_EPSILON}={self.epsilon:g}"
        if self.delta is not None and delta > self.delta:
            return f"privacy.delta={delta:.3g} exceeds this node's {NODE_DELTA}={self.delta:.3g}"
        if self.max_grad_norm is not None and max_grad_norm > self.max_grad_norm:
            return (
                f"privacy.max_grad_norm={max_grad_norm:g} exceeds this node's {NODE_MAX_GRAD_NORM}="
                f"{self.max_grad_norm:g} (a larger sensitivity than the node accepts)"
            )
        if not poisson_sampling:
            return "privacy.poisson_sampling=false: the accounting (subsampled Gaussian) assumes Poisson sampling"
        return None

    def describe(self) -> str:
        parts = [(NODE_EPSILON, self.epsilon), (NODE_DELTA, self.delta), (NODE_MAX_GRAD_NORM, self.max_grad_norm)]
        return " ".join(f"{k}={v:g}" for k, v in parts if v is not None) or "no bounds"


def parse_node_policies(entries: Iterable[str]) -> dict[int, NodePolicy]:
    """Simulated node policies from ``privacy.node_policies`` entries written like a node config,
    ``"partition-id=0 privacy-epsilon=3 privacy-delta=1e-5"``; keyed by partition id."""
    out: dict[int, NodePolicy] = {}
    for entry in entries:
        pairs = dict(item.partition("=")[::2] for item in shlex.split(entry))
        if "partition-id" not in pairs:
            raise ValueError(f"privacy.node_policies entry {entry!r} needs partition-id=N.")
        unknown = sorted(set(pairs) - {"partition-id", *POLICY_KEYS})
        if unknown:
            raise ValueError(
                f"privacy.node_policies entry {entry!r} has unknown key(s) {unknown}; use {list(POLICY_KEYS)} "
                f"({NODE_STATE_DIR} is a node's own setting: --node-config only)."
            )
        out[int(pairs["partition-id"])] = NodePolicy.from_mapping(pairs)
    return out


class AccountantStore:
    """A node's accountant for one run, in ``<state_dir>/run-<run_id>-partition-<pid>.json``.

    Written atomically (a temporary file in the same folder, then ``os.replace``), so a crash leaves the
    previous record or the new one, never half a file.
    """

    def __init__(self, state_dir: str | Path, *, run_id: int, partition_id: int) -> None:
        self.path = Path(state_dir).expanduser() / f"run-{run_id}-partition-{partition_id}.json"

    def load(self) -> ClientAccountant | None:
        if not self.path.is_file():
            return None
        state = json.loads(self.path.read_text())
        acc = ClientAccountant(str(state.get("kind")))
        acc.load_state_dict(state)
        return acc

    def save(self, accountant: ClientAccountant) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(accountant.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def most_spent(candidates: Iterable[ClientAccountant | None], *, delta: float) -> ClientAccountant | None:
    """The accountant that has recorded the most privacy loss at `delta` (the first of equals): copies from
    elsewhere can raise what a node has recorded, never lower it."""
    best: ClientAccountant | None = None
    best_key = (-1.0, -1)
    for acc in candidates:
        if acc is None:
            continue
        key = (acc.epsilon(delta), acc.steps)
        if key > best_key:
            best, best_key = acc, key
    return best
