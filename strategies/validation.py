"""Checks a client's training reply before it may touch the aggregate."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import Message

from fl import constants as K
from fl.wire import from_record


def reply_problem(msg: Message, *, expected: Mapping[str, tuple[int, ...]], server_round: int) -> str | None:
    """Why a training reply must be rejected, or None if it is sound.

    Parameters
    ----------
    msg : Message
        The reply (not an error reply; those are counted as failures before this).
    expected : mapping of str to shape
        The tensor names and shapes this method's clients must send back.
    server_round : int
        The round the server is aggregating; a reply for another round is stale.
    """
    content = msg.content
    if K.METRICS not in content.metric_records:
        return f"no MetricRecord {K.METRICS!r}"
    metrics = content.metric_records[K.METRICS]
    n = metrics.get(K.NUM_EXAMPLES)
    if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
        return f"{K.NUM_EXAMPLES}={n!r} must be a positive number"
    got_round = metrics.get(K.SERVER_ROUND)
    if isinstance(got_round, int | float) and int(got_round) != server_round:
        return f"{K.SERVER_ROUND}={got_round} but the server is in round {server_round}"
    if K.ARRAYS not in content.array_records:
        return f"no ArrayRecord {K.ARRAYS!r}"
    try:
        state = from_record(content.array_records[K.ARRAYS])
    except Exception as e:  # any undecodable array is a bad reply, not a crash
        return f"arrays could not be decoded ({type(e).__name__}: {e})"
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        return f"wrong tensor names (missing {missing[:2]}, extra {extra[:2]})"
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name]):
            return f"{name} has shape {tuple(t.shape)}, expected {tuple(expected[name])}"
        if not t.is_floating_point():
            return f"{name} has dtype {t.dtype}, expected a float tensor"
        if not bool(torch.isfinite(t).all()):
            return f"{name} holds NaN or Inf"
    return None
