"""`LoopGrid`: a Flower Grid that hands each message to the real ClientApp in this process, one Context per node.

Rounds of a real strategy run without Ray or processes; tests read each node's `Context.state` afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fl import constants as K
from fl.app.client_app import app as client_app


class LoopGrid(Grid):
    """A Grid that runs the ClientApp in this process for each message (one Context per node)."""

    def __init__(self, num_nodes: int, app: Any = client_app) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0  # a Message needs a run
        self.contexts = {
            100 + pid: Context(
                run_id=7,
                node_id=100 + pid,
                # simulated nodes: the seeded noise, as in a simulation (no Opacus secure_mode)
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
        for msg in messages:
            self.sent.append(msg)
            replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies
