"""`LoopGrid`: the inline runtime's grid (fl.app.inline.InlineGrid) that also keeps every message it sent.

Rounds of a real strategy run without Ray or processes; tests read each node's `Context.state` (`contexts`) and
what the server sent (`sent`) afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message

from fl.app.inline import InlineGrid


class LoopGrid(InlineGrid):
    """An `InlineGrid` (the real ClientApp, or one that wraps it: tests/faulty_client.py) recording `sent`."""

    def __init__(self, num_nodes: int, app: Any = None) -> None:
        super().__init__(num_nodes, app)
        self.sent: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.sent.extend(messages)
        return super().push_messages(messages)
