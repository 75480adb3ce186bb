"""`sim.runtime=inline`: the federation in fl-sim's own process, no Ray, no SuperLink.

The ServerApp's `run_server` drives an `InlineGrid`, which hands each message to the real ClientApp in this
process, one node `Context` per simulated client, one client after another. It is what Flower's Simulation Runtime
does for each message (`flwr.server.superlink.fleet.vce.vce_api`), minus the processes: the message and the node's
context are copied as they would be over the wire (a ClientApp never holds the server's tensors), a ClientApp that
raises becomes an error reply (`ErrorCode.CLIENT_APP_RAISED_EXCEPTION`) and its node's context is not updated, and
the nodes are simulated (seeded DP noise, `fl.runtime_env.SIMULATION_ENV`). A run ends with the same metrics as on
Ray (tests/test_simulation.py).

Why it exists: a tiny run on Ray costs ~45 s of CPU for ~2 s of training (the SuperLink, `flwr-simulation`, Ray's
daemons and an actor, each importing torch), which dominates tiny sweeps and tests; and a debugger's breakpoint in
a ClientApp works here. What it cannot do, and Ray can: clients in parallel, per-client CPU/GPU reservations,
isolation of a client that crashes its process, a cluster (`sim.ray_address`), and stopping a client past
`sim.timeout` mid-step (here the round stops waiting between clients). Flower has no in-process runtime of its
own (1.41: the Simulation Runtime runs on Ray only), so this one is written here.
"""

from __future__ import annotations

import copy
import logging
import os
import traceback
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fl import constants as K
from fl.runtime_env import SIMULATION_ENV

log = logging.getLogger(__name__)

RUN_ID = 7  # the one run an inline grid serves (a Message needs a run id)


class InlineGrid(Grid):
    """A Flower `Grid` whose nodes are ClientApp calls in this process (`num_nodes` of them, partition ids 0..n-1).

    `push_messages` queues; each `pull_messages` runs the next queued message addressed to the ids asked for and
    returns its reply, so a progress display (fl.app.progress.ProgressGrid) moves with each client. A whole batch
    also runs through `send_and_receive`.
    """

    pull_interval = 0.0  # each pull runs a client to its reply: nothing to wait for between pulls (ProgressGrid)

    def __init__(self, num_nodes: int, app: Any = None, *, node_config: dict[str, Any] | None = None) -> None:
        if app is None:
            from fl.app.client_app import app as client_app  # the real ClientApp (torch, PEFT, Opacus)

            app = client_app
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 0
        self.app = app
        self.contexts = {
            100 + pid: Context(
                run_id=RUN_ID,
                node_id=100 + pid,
                node_config={
                    K.NODE_PARTITION_ID: pid,
                    K.NODE_NUM_PARTITIONS: num_nodes,
                    # no Opacus secure_mode: the noise is seeded, as on a simulated node (privacy.noise)
                    "privacy-secure-rng": "false",
                    **(node_config or {}),
                },
                state=RecordDict(),
                run_config={},
            )
            for pid in range(num_nodes)
        }
        self._queue: dict[str, Message] = {}

    # The Grid ABC's run/message factories: the strategies here build Messages with the constructor.
    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Any:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._queue.clear()  # what a round stopped waiting for (sim.timeout) is not delivered later
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this inline federation")
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's InMemoryGrid does
            self._queue[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        key = next((k for k in self._queue if k in wanted), None)
        if key is None:
            return []
        return [self.deliver(self._queue.pop(key))]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        return [reply for _ in ids for reply in self.pull_messages(ids)]

    def deliver(self, msg: Message) -> Message:
        """Run the ClientApp on a copy of `msg` and of its node's context; keep the context only if it returned."""
        node = msg.metadata.dst_node_id
        context = copy.deepcopy(self.contexts[node])
        try:
            with simulated_node():
                reply = self.app(copy.deepcopy(msg), context)
        except Exception as e:
            log.error("ClientApp of node %d raised %s: %s\n%s", node, type(e).__name__, e, traceback.format_exc())
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e)}:<'{e}'>"), reply_to=msg)
        self.contexts[node] = context
        return copy.deepcopy(reply)


@contextmanager
def simulated_node() -> Iterator[None]:
    """While a ClientApp runs here, this process is a simulated node (as fl-sim's Ray actors are): DP randomness
    is seeded from the run seed, so inline runs reproduce and equal the Simulation Runtime's. Torch's thread count
    is the ClientApp's to set (train.threads, else one per reserved CPU) and is put back afterwards."""
    before, threads = os.environ.get(SIMULATION_ENV), torch.get_num_threads()
    os.environ[SIMULATION_ENV] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if before is None:
            os.environ.pop(SIMULATION_ENV, None)
        else:
            os.environ[SIMULATION_ENV] = before


def run_inline(overrides: list[str], run_dir: Path, num_clients: int, *, threads: int, client_app: Any = None) -> Path:
    """Run the job of `overrides` with `num_clients` inline nodes; the ServerApp's failures are recorded as on Ray
    (`<run folder>/error.log`) and raised. Returns the run folder."""
    from fl.app.console import write_failure
    from fl.app.server_app import run_server

    torch.set_num_threads(threads)  # the server's evaluation on the cores a Ray run would give its actor
    try:
        return run_server(InlineGrid(num_clients, client_app), overrides)
    except Exception as e:
        write_failure(run_dir, e)
        raise
