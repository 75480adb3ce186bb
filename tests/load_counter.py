"""The real ServerApp and ClientApp, counting base-model builds, for the test that a simulation loads the model once
on the server's side.

With FEDLORA_LOAD_LOG=<file> set (an environment variable, so `flwr-simulation` and its Ray actors see it), every
`Task.build_model` call (what `fl.tasks.load_base_model` runs) in a process that imported this module appends one
JSON line to the file: the process id and its program name. Used as ``fl.app.simulation.SERVER_APP =
"load_counter:server_app"`` and ``run_simulation(..., client_app="load_counter:client_app")``.

The ClientApp's functions live here, not only its object: Flower ships a ClientApp to its Ray actors pickled, so an
actor imports the module that defines the functions (this one, which installs the counting), not the one that named
the object. Each hands the whole message to the real ClientApp, its mods included.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fl.app.client_app import app as real_client_app
from fl.app.server_app import make_server_app
from fl.tasks import get_task, task_names

LOAD_LOG_ENV = "FEDLORA_LOAD_LOG"


def counted(build: Callable[..., Any]) -> Callable[..., Any]:
    """`build` (a task's `build_model`), appending this process's line to $FEDLORA_LOAD_LOG before each call."""

    def build_model(*args: Any, **kwargs: Any) -> Any:
        path = os.environ.get(LOAD_LOG_ENV)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "program": Path(sys.argv[0]).name}) + "\n")
        return build(*args, **kwargs)

    return build_model


for _name in task_names():
    _task = get_task(_name)
    _task.build_model = counted(_task.build_model)  # type: ignore[method-assign]

server_app = make_server_app()
client_app = ClientApp()


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    return real_client_app(msg, context)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return real_client_app(msg, context)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real_client_app(msg, context)


__all__ = ["LOAD_LOG_ENV", "client_app", "counted", "server_app"]
