"""Simulated hostile clients: what a registered client that misbehaves sends (for research and for tests).

An attacker trains like an honest client and sends the same messages, the same keys, shapes and dtypes, at the
same time — only the content differs (`sim.attack`, `sim.attack_strength`; which partitions: `sim.attackers`, a
count drawn with the run seed or a list of partition ids; a deployed node: `--node-config "attack=scale
attack-strength=100"`). With u = trained − received (the client's honest update of every tensor it sends):

- ``scale``: sends received + s·u (s = 100 by default): one client moves an unweighted mean by s/n of its update.
- ``sign_flip``: sends received − s·u (s = 1): pushes the model up the loss.
- ``gaussian``: sends received + noise, i.i.d. N(0, (s·rms(u))²) per coordinate (s = 10): a random update of
  s times the honest update's scale, seeded per (run, round, partition).
- ``label_flip``: trains on labels y → (y + 1) mod C (classification only; s unused): a finite, honest-looking
  update toward a wrong model (Tolpegin et al., ESORICS 2020, https://arxiv.org/abs/2007.08432).
- ``num_examples``: an honest update, but claims s·n_k examples (s = 100): takes over an n_k-weighted mean.

Baruch et al. (NeurIPS 2019) and Fang et al. (USENIX Security 2020) show stronger, defence-aware attacks; these
are the textbook ones each defence is meant to bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fl import constants as K
from fl.checks import require
from fl.data import IndexedDataset
from fl.tasks import get_task

ATTACKS = ("none", "scale", "sign_flip", "gaussian", "label_flip", "num_examples")
DEFAULT_STRENGTH = {"scale": 100.0, "sign_flip": 1.0, "gaussian": 10.0, "label_flip": 1.0, "num_examples": 100.0}
ATTACKER_SALT = 4_447  # the attackers' draw: seed + salt


@dataclass(frozen=True)
class Attack:
    """One client's behaviour: `kind` (one of ATTACKS) with `strength` s."""

    kind: str = "none"
    strength: float = 0.0

    @property
    def active(self) -> bool:
        """Whether this client attacks."""
        return self.kind != "none"

    def data(self, dataset: IndexedDataset, num_labels: int) -> IndexedDataset:
        """The partition it trains on: labels shifted by one class for ``label_flip``, else as given."""
        if self.kind != "label_flip":
            return dataset
        split = dataset.split.subset(dataset.indices)
        return IndexedDataset(replace(split, labels=(split.labels + 1) % num_labels))

    def reply(
        self, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], *, seed: int
    ) -> dict[str, torch.Tensor]:
        """The tensors it sends, from its trained ones and the global ones it received (same keys)."""
        if self.kind not in ("scale", "sign_flip", "gaussian"):
            return dict(trained)
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, t in trained.items():
            base = received[name].double()
            update = t.double() - base
            if self.kind == "scale":
                sent = base + self.strength * update
            elif self.kind == "sign_flip":
                sent = base - self.strength * update
            else:
                rms = float(update.pow(2).mean().sqrt())
                sent = base + self.strength * rms * torch.randn(t.shape, generator=gen, dtype=torch.float64)
            out[name] = sent.to(t.dtype)
        return out

    def num_examples(self, n: int) -> int:
        """The example count it reports."""
        return round(n * self.strength) if self.kind == "num_examples" else n


def attacker_ids(cfg: Any) -> list[int]:
    """The partitions that attack in this run (`sim.attackers`: a count drawn with the run seed, or ids)."""
    sim = cfg.sim
    if sim.attack == "none":
        return []
    who = sim.attackers
    if isinstance(who, int):
        draw = np.random.default_rng(int(cfg.seed) + ATTACKER_SALT).choice(
            int(sim.num_clients), size=who, replace=False
        )
        return sorted(int(i) for i in draw)
    return sorted(int(i) for i in who)


def attack_for(cfg: Any, node_config: Mapping[str, Any], partition_id: int) -> Attack:
    """This client's behaviour: its node config's `attack` (deployment) or the run's `sim.attack*`."""
    kind = str(node_config.get(K.NODE_ATTACK, "none"))
    if kind != "none":
        require(kind in ATTACKS, f"node config {K.NODE_ATTACK}", kind, f"use one of {', '.join(ATTACKS)}.")
        strength = node_config.get(K.NODE_ATTACK_STRENGTH)
        return Attack(kind, DEFAULT_STRENGTH[kind] if strength is None else float(str(strength)))
    if partition_id not in attacker_ids(cfg):
        return Attack()
    kind = str(cfg.sim.attack)
    strength = cfg.sim.attack_strength
    return Attack(kind, DEFAULT_STRENGTH[kind] if strength is None else float(strength))


def validate_attack(cfg: Any) -> None:
    """Check `sim.attack`, `sim.attackers` and `sim.attack_strength` (ValueError naming the key)."""
    sim = cfg.sim
    require(sim.attack in ATTACKS, "sim.attack", sim.attack, f"use one of {', '.join(ATTACKS)}.")
    who, n = sim.attackers, int(sim.num_clients)
    if isinstance(who, int) and not isinstance(who, bool):
        require(0 <= who <= n, "sim.attackers", who, f"use a count in [0, sim.num_clients={n}] or a list of ids.")
    else:
        ids = list(who) if who is not None and not isinstance(who, str | bool) else None
        require(
            ids is not None and all(isinstance(i, int) and 0 <= i < n for i in ids) and len(set(ids)) == len(ids),
            "sim.attackers",
            who,
            f"use a count, or a list of distinct partition ids in [0, {n}), e.g. [0,3].",
        )
    require(
        sim.attack_strength is None or sim.attack_strength > 0,
        "sim.attack_strength",
        sim.attack_strength,
        "use a positive strength, or null for the attack's default.",
    )
    require(
        sim.attack != "label_flip" or get_task(str(cfg.model.task)).class_labels,
        "sim.attack",
        sim.attack,
        f"label_flip flips class labels, and model.task={cfg.model.task} has none: use a classification task.",
    )
