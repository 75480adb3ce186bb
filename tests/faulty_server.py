"""A fault-injecting ServerApp for the failure tests: the real one, whose aggregation raises on cue.

FEDLORA_SERVER_FAULT=<round> (an environment variable, so `flwr-simulation` sees it) makes the strategies'
shared `aggregate_train` raise `ValueError("injected aggregation failure")` in that (absolute) round. Used as
`fl.app.simulation.SERVER_APP = "faulty_server:app"` in a child fl-sim process, never in the test process.
"""

from __future__ import annotations

import os
from typing import Any

from fl.app.server_app import make_server_app
from strategies.base import LoraStrategy

_real_aggregate_train = LoraStrategy.aggregate_train


def aggregate_train(self: LoraStrategy, server_round: int, replies: Any) -> Any:
    if server_round + self.round_offset == int(os.environ.get("FEDLORA_SERVER_FAULT", "0")):
        raise ValueError("injected aggregation failure")
    return _real_aggregate_train(self, server_round, replies)


LoraStrategy.aggregate_train = aggregate_train  # type: ignore[method-assign]
app = make_server_app()
