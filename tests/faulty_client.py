"""A fault-injecting ClientApp for the reliability tests: it wraps the real one and misbehaves on cue.

`train.fault`-style behaviour is chosen by partition id and round through FAULTS (set in each test's
overrides as the env var FEDLORA_FAULTS, e.g. "1:1:raise,0:2:nan"), so the Ray actors see it too.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fl import constants as K
from fl.app import client_app as real
from fl.wire import from_record, to_record

app = ClientApp()


def _fault(msg: Message, context: Context) -> str | None:
    pid = int(str(context.node_config[K.NODE_PARTITION_ID]))
    rnd = int(str(msg.content.config_records[K.CONFIG][K.SERVER_ROUND]))
    for item in filter(None, os.environ.get("FEDLORA_FAULTS", "").split(",")):
        p, r, kind = item.split(":")
        if int(p) == pid and int(r) == rnd:
            return kind
    return None


@app.query()
def hello(msg: Message, context: Context) -> Message:
    return real.hello(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    fault = _fault(msg, context)
    if fault == "raise":
        raise RuntimeError("injected client failure")
    if fault == "sleep":
        time.sleep(float(os.environ.get("FEDLORA_FAULT_SLEEP", "20")))
    reply = real.train(msg, context)
    if fault in ("nan", "shape", "extra"):
        state = from_record(reply.content.array_records[K.ARRAYS])
        key = sorted(state)[0]
        if fault == "nan":
            state[key] = torch.full_like(state[key], float("nan"))
        elif fault == "shape":
            state[key] = torch.zeros(3, 3)
        else:
            state["not.a.tensor"] = torch.zeros(2)
        content = RecordDict({K.ARRAYS: to_record(state), K.METRICS: reply.content.metric_records[K.METRICS]})
        return Message(content, reply_to=msg)
    return reply
