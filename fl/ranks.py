"""Each client's LoRA rank: one rank for all (`strategy.rank`), a list over partitions (`sim.client_ranks`, cycled
or drawn with the run's seed: `sim.client_rank_draw`), or the node's own (`--node-config "lora-rank=4"`).

A node's own rank wins over the run's list: in deployment the data holder knows its budget. The server learns each
node's rank from its answer to the hello query (`strategies.sampling`), so the same code serves both runtimes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fl import constants as K

RANK_DRAWS = ("cycle", "random")
RANKS_KEY = "sim.client_ranks"
RANK_KEY = "strategy.rank"


def partition_rank(cfg: Any, pid: int) -> int:
    """The rank of partition `pid` from the run config: `sim.client_ranks` (cycled over partition ids, or a seeded
    draw from the list), else `strategy.rank`."""
    ranks = cfg.sim.client_ranks
    if not ranks:
        return int(cfg.strategy.rank)
    ranks = [int(r) for r in ranks]
    if str(cfg.sim.client_rank_draw) == "cycle":
        return ranks[pid % len(ranks)]
    draws = np.random.default_rng(int(cfg.seed) + 7727).integers(0, len(ranks), size=max(pid + 1, 1))
    return ranks[int(draws[pid])]


def client_rank(cfg: Any, pid: int, node_config: Mapping[str, Any] | None = None) -> int:
    """The rank this client trains at: its node's `lora-rank` if set, else `partition_rank`."""
    own = (node_config or {}).get(K.NODE_LORA_RANK)
    if own is None or str(own) == "":
        return partition_rank(cfg, pid)
    try:
        rank = int(str(own))
    except ValueError:
        rank = 0
    if rank < 1:
        raise ValueError(f"--node-config {K.NODE_LORA_RANK}={own!r} is invalid: use a positive integer rank.")
    return rank


def rank_source(node_config: Mapping[str, Any] | None = None) -> str:
    """The key a client's rank came from (named in errors)."""
    return f"--node-config {K.NODE_LORA_RANK}" if (node_config or {}).get(K.NODE_LORA_RANK) else RANKS_KEY


def configured_ranks(cfg: Any) -> dict[str, int]:
    """Every rank the run config names, by key (`strategy.rank`, `sim.client_ranks[i]`): what must fit the model."""
    out = {RANK_KEY: int(cfg.strategy.rank)}
    for i, r in enumerate(cfg.sim.client_ranks or []):
        out[f"{RANKS_KEY}[{i}]"] = int(r)
    return out


def is_mixed(cfg: Any) -> bool:
    """Whether the run config gives clients different ranks (or ranks other than `strategy.rank`)."""
    ranks = {int(r) for r in (cfg.sim.client_ranks or [])}
    return bool(ranks) and ranks != {int(cfg.strategy.rank)}
