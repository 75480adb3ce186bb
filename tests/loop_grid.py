"""`LoopGrid`: a Flower Grid that hands each message to the real ClientApp in this process, one Context per node.

Rounds of a real strategy run without Ray or processes; tests read each node's `Context.state` afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fl import constants as K
from fl.app.client_app import app as client_app
from fl.runtime_env import SIMULATION_ENV


class LoopGrid(Grid):
    """A Grid that runs the ClientApp in this process for each message (one Context per node)."""

    def __init__(self, num_nodes: int, app: Any = client_app) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0  # a Message needs a run
        self.contexts = {
            100 + pid: Context(
                run_id=7,
                node_id=100 + pid,
                # no Opacus secure_mode (torchcsprng is not installed); the noise is seeded as in a simulation
                # because send_and_receive marks these nodes simulated (privacy.noise)
                node_config={K.NODE_PARTITION_ID: pid, K.NODE_NUM_PARTITIONS: num_nodes, "privacy-secure-rng": "false"},
                state=RecordDict(),
                run_config={},
            )
            for pid in range(num_nodes)
        }
        self.sent: list[Message] = []
        self.app = app  # the real ClientApp, or one that wraps it (tests/faulty_client.py)

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
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        with simulated_nodes():
            for msg in messages:
                self.sent.append(msg)
                replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


@contextmanager
def simulated_nodes() -> Iterator[None]:
    """While the ClientApp runs here, this process is a simulated node (as fl-sim's actors are): DP randomness is
    seeded from the run seed, so in-process runs reproduce and equal the Simulation Runtime's."""
    before = os.environ.get(SIMULATION_ENV)
    os.environ[SIMULATION_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SIMULATION_ENV, None)
        else:
            os.environ[SIMULATION_ENV] = before
