"""Which nodes a round asks: partition ids learnt once per node, then a seeded draw in partition order.

Flower's `FedAvg.sample_nodes` draws from the grid's node ids, which differ from run to run; sampling by
partition id with the run's seed makes a run reproducible whichever ids the runtime hands out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl import constants as K
from strategies.stats import scalars

log = logging.getLogger(__name__)

DISCOVERY_TIMEOUT = 300.0  # seconds the first hello to a node may take (process start-up included)


EVAL_SALT = 2_601  # the seed salt of the clients that evaluate (`NodeSampler.subset`)


class NodeSampler:
    """Seeded node sampling over the nodes' partition ids.

    Parameters
    ----------
    seed : int
        The run seed (the draws use a generator of their own, seed + 17).
    num_nodes : int
        Nodes to wait for before the first round (`sim.num_clients`).
    timeout : float
        Seconds to wait for them (`sim.timeout`), and the floor of the hello query's timeout.
    hello : callable
        The ConfigRecord of the hello query.
    cyclic : bool
        `sim.client_sampling=cyclic`: shuffled cyclic participation (Cho et al., "On the Convergence of Federated
        Averaging with Cyclic Client Participation", ICML 2023): a seeded permutation of the partitions is taken k
        a round, a new one when it runs out, so every client trains once in every ⌈N/k⌉ rounds instead of when
        independent draws happen to pick it. Flower's strategies draw afresh each round (`sample_nodes`): no
        cyclic sampler to reuse. False: a fresh uniform draw each round.
    """

    def __init__(
        self, *, seed: int, num_nodes: int, timeout: float, hello: Callable[[], ConfigRecord], cyclic: bool = False
    ) -> None:
        self.rng = np.random.default_rng(int(seed) + 17)
        self.cyclic = cyclic
        self.queue: list[int] = []  # cyclic: the partition ids left in this cycle's permutation, in order
        self.seed, self.num_nodes, self.timeout, self.hello = int(seed), int(num_nodes), float(timeout), hello
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.rank_of: dict[int, int] = {}  # node id -> the LoRA rank it trains at (when its hello says)

    def discover(self, grid: Grid) -> None:
        """Learn the partition id of every connected node not seen yet (one small query each)."""
        new = [n for n in sorted(grid.get_node_ids()) if n not in self.partition_of]
        if not new:
            return
        msgs = [Message(RecordDict({K.CONFIG: self.hello()}), n, MessageType.QUERY) for n in new]
        # Fresh ClientApp processes import torch and transformers before answering: give them time,
        # independent of a short round timeout. Nodes that stay silent are asked again next round.
        for reply in grid.send_and_receive(msgs, timeout=max(self.timeout, DISCOVERY_TIMEOUT)):
            if reply.has_error():
                log.warning(
                    "Node %d did not answer the hello query: %s", reply.metadata.src_node_id, reply.error.reason
                )
                continue
            said = scalars(reply.content.metric_records[K.METRICS])
            self.partition_of[reply.metadata.src_node_id] = int(said[K.PARTITION_ID])
            if K.LORA_RANK in said:
                self.rank_of[reply.metadata.src_node_id] = int(said[K.LORA_RANK])

    def wait_for_nodes(self, grid: Grid) -> None:
        """Block until `num_nodes` nodes are connected (TimeoutError after `timeout` seconds)."""
        deadline = time.monotonic() + self.timeout
        while len(list(grid.get_node_ids())) < self.num_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Only {len(list(grid.get_node_ids()))} of sim.num_clients="
                    f"{self.num_nodes} nodes connected within {self.timeout} s."
                )
            time.sleep(0.5)

    def known(self, grid: Grid) -> list[int]:
        """Connected nodes with a known partition id, in partition order (after waiting and discovering)."""
        self.wait_for_nodes(grid)
        self.discover(grid)
        online = set(grid.get_node_ids())  # a node that left (e.g. a restarted SuperNode's old id) is not sampled
        return sorted((n for n in self.partition_of if n in online), key=self.partition_of.__getitem__)

    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """A seeded draw of max(`minimum`, round(`fraction` × known)) nodes, in partition order."""
        known = self.known(grid)
        k = min(len(known), max(minimum, round(fraction * len(known))))
        if k == len(known):
            return known
        if self.cyclic:
            return self.next_in_cycle(known, k)
        picks = self.rng.choice(len(known), size=k, replace=False)
        return [known[i] for i in sorted(picks)]

    def next_in_cycle(self, known: list[int], k: int) -> list[int]:
        """The next `k` of the cycle's partitions among the `known` nodes, in partition order. When the cycle runs
        out mid-round its last partitions go first and a new permutation, those at its end, fills the round; a
        partition whose node is offline is passed over until the next cycle."""
        node_of = {self.partition_of[n]: n for n in known}
        picks: list[int] = []
        while len(picks) < k:
            if not self.queue:
                fresh = [int(p) for p in self.rng.permutation(sorted(node_of))]
                self.queue = [p for p in fresh if p not in picks] + [p for p in fresh if p in picks]
            p = self.queue.pop(0)
            if p in node_of and p not in picks:
                picks.append(p)
        return [node_of[p] for p in sorted(picks)]

    def subset(self, grid: Grid, fraction: float, *, salt: int) -> list[int]:
        """A seeded `fraction` (at least one) of all known nodes from a generator of its own (seed + `salt`),
        so the rounds' draws stay the same whatever this subset is used for (e.g. Fed-SB's init clients)."""
        self.wait_for_nodes(grid)
        self.discover(grid)
        known = sorted(self.partition_of, key=self.partition_of.__getitem__)
        k = min(len(known), max(1, round(float(fraction) * len(known))))
        picks = np.random.default_rng(self.seed + salt).choice(len(known), size=k, replace=False)
        return [known[i] for i in sorted(picks)]

    def state_dict(self) -> dict[str, Any]:
        """The draw generator's state and the cycle's partitions left (for checkpoints)."""
        return {"rng": self.rng.bit_generator.state, "queue": list(self.queue)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.rng.bit_generator.state = state["rng"]
        self.queue = [int(p) for p in state.get("queue", [])]
