"""Screening a round's replies before they may touch the aggregate: errors, declines, then each reply's records,
names, shapes, dtypes, finiteness and round. Each reply's arrays are decoded once, here."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import Message

from fl import constants as K
from fl.wire import array_bytes, from_record
from strategies.stats import RoundStats, scalars

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """A sound training reply, decoded once."""

    node: int
    partition: int  # the node's partition id (its node id when unknown)
    state: dict[str, torch.Tensor]  # the arrays it sent
    metrics: dict[str, float]  # its scalar metrics
    records: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # extra ArrayRecords (SCAFFOLD's Δc_i)


def decline_reason(msg: Message) -> str:
    """Why a client declined (its `privacy-decline` record), or the default reason."""
    decline = msg.content.config_records.get(K.DECLINE_RECORD)
    if decline is not None and K.DECLINE_REASON in decline:
        return str(decline[K.DECLINE_REASON])
    return "privacy budget"


def screen(
    server_round: int,
    replies: Iterable[Message],
    *,
    expected: Mapping[str, tuple[int, ...]] | Callable[[int], Mapping[str, tuple[int, ...]]],
    stats: RoundStats,
    partition_of: Mapping[int, int],
    on_reply: Callable[[int, Message], None] | None = None,
    records: Mapping[str, Mapping[str, tuple[int, ...]]] | None = None,
) -> list[Reply]:
    """Count every reply of (absolute) round `server_round` in `stats`; return the sound training replies.

    Error replies, missing replies, declines and replies that fail `check_reply` are logged and left out (an
    error reply's reason is kept by partition in `stats.client_errors`);
    `on_reply(node, msg)` sees every reply that arrived without an error (e.g. to keep its accountant state).
    `records` names extra ArrayRecords a sound reply must also carry, with their tensors' names and shapes
    (SCAFFOLD's Δc_i); each is checked as the arrays are (`check_record`) and decoded into `Reply.records`.
    """
    good: list[Reply] = []
    replies = list(replies)
    stats.failed += max(0, stats.sampled - len(replies))
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            stats.fail(partition_of.get(node, node), msg.error.reason)
            log.warning("round %d: client on node %d failed: %s", server_round, node, msg.error.reason)
            continue
        stats.replied += 1
        stats.bytes_up += array_bytes(msg.content)
        if on_reply is not None:
            on_reply(node, msg)
        record = msg.content.metric_records.get(K.METRICS)
        metrics = scalars(record) if record is not None else {}
        if metrics.get(K.DECLINED, 0.0):
            stats.declined += 1
            log.warning("round %d: client on node %d declined to train: %s", server_round, node, decline_reason(msg))
            continue
        shapes = expected(node) if callable(expected) else expected  # per node: its own rank (heterogeneous runs)
        problem, state = check_reply(msg, expected=shapes, server_round=server_round)
        extra: dict[str, dict[str, torch.Tensor]] = {}
        for key, want in (records or {}).items():
            if problem is None:
                problem, decoded = check_record(msg, key, want)
                extra[key] = decoded or {}
        if problem is not None or state is None:
            stats.rejected += 1
            log.warning("round %d: rejected the reply of node %d: %s", server_round, node, problem)
            continue
        good.append(Reply(node, partition_of.get(node, node), state, metrics, extra))
    return good


def reply_problem(msg: Message, *, expected: Mapping[str, tuple[int, ...]], server_round: int) -> str | None:
    """Why a training reply must be rejected, or None if it is sound (`check_reply` without the arrays)."""
    return check_reply(msg, expected=expected, server_round=server_round)[0]


def check_reply(
    msg: Message, *, expected: Mapping[str, tuple[int, ...]], server_round: int
) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """(why a training reply must be rejected or None, its decoded arrays when sound).

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
        return f"no MetricRecord {K.METRICS!r}", None
    metrics = content.metric_records[K.METRICS]
    n = metrics.get(K.NUM_EXAMPLES)
    if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
        return f"{K.NUM_EXAMPLES}={n!r} must be a positive number", None
    got_round = metrics.get(K.SERVER_ROUND)
    if isinstance(got_round, int | float) and int(got_round) != server_round:
        return f"{K.SERVER_ROUND}={got_round} but the server is in round {server_round}", None
    return check_record(msg, K.ARRAYS, expected)


def check_record(
    msg: Message, key: str, expected: Mapping[str, tuple[int, ...]]
) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """(why the reply's ArrayRecord `key` is unsound or None, its decoded tensors when sound): present, decodable,
    exactly the `expected` names and shapes, float and finite."""
    content = msg.content
    if key not in content.array_records:
        return f"no ArrayRecord {key!r}", None
    try:
        state = from_record(content.array_records[key])
    except Exception as e:  # any undecodable array is a bad reply, not a crash
        return f"{key} could not be decoded ({type(e).__name__}: {e})", None
    where = "" if key == K.ARRAYS else f"{key}: "
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        return f"{where}wrong tensor names (missing {missing[:2]}, extra {extra[:2]})", None
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name]):
            return f"{where}{name} has shape {tuple(t.shape)}, expected {tuple(expected[name])}", None
        if not t.is_floating_point():
            return f"{where}{name} has dtype {t.dtype}, expected a float tensor", None
        if not bool(torch.isfinite(t).all()):
            return f"{where}{name} holds NaN or Inf", None
    return None, state
