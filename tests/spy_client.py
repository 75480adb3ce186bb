"""A ClientApp that records what each client received and kept, for tests that run in Ray actors.

It wraps the real one; with FEDLORA_SPY_DIR set, every train or evaluate message appends a line to
`<dir>/<partition>.jsonl` (round, phase, the array names received), and after training the tensors the client
keeps as its own (`Context.state`) and its example count are saved to `<dir>/<partition>-<round>.pt`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fl import constants as K
from fl.app import client_app as real
from fl.wire import from_record

app = ClientApp()


def _record(msg: Message, context: Context, phase: str) -> tuple[Path, int, int] | None:
    root = os.environ.get("FEDLORA_SPY_DIR")
    if not root:
        return None
    pid = int(str(context.node_config[K.NODE_PARTITION_ID]))
    rnd = int(str(msg.content.config_records[K.CONFIG][K.SERVER_ROUND]))
    names = sorted(n for rec in msg.content.array_records.values() for n in rec)
    with (Path(root) / f"{pid}.jsonl").open("a") as f:
        f.write(json.dumps({"round": rnd, "phase": phase, "received": names}) + "\n")
    return Path(root), pid, rnd


@app.query()
def hello(msg: Message, context: Context) -> Message:
    return real.hello(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    where = _record(msg, context, "train")
    reply = real.train(msg, context)
    if where is not None and K.STATE_PERSONAL in context.state.array_records:
        root, pid, rnd = where
        kept = from_record(context.state.array_records[K.STATE_PERSONAL])
        sent = from_record(reply.content.array_records[K.ARRAYS])
        n = int(reply.content.metric_records[K.METRICS][K.NUM_EXAMPLES])  # type: ignore[arg-type]
        torch.save({"kept": kept, "sent": sent, "num_examples": n}, root / f"{pid}-{rnd}.pt")
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _record(msg, context, "evaluate")
    return real.evaluate_local(msg, context)
