"""What the server saw in one round: the counters and sums behind one line of metrics.jsonl."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict

from fl import constants as K
from fl.wire import array_bytes, from_record, num_floats

log = logging.getLogger(__name__)

ERROR_CHARS = 200
"""Characters of a client's error text kept in a round's `client_errors` (the log has it whole)."""


def scalars(record: MetricRecord) -> dict[str, float]:
    """The scalar entries of a MetricRecord as floats (lists are left out)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


@dataclass
class RoundStats:
    """What the server saw in one round (one line of metrics.jsonl, with central evaluation)."""

    sampled: int = 0
    replied: int = 0
    aggregated: int = 0
    failed: int = 0  # error replies (exception, timeout) and missing replies
    rejected: int = 0  # replies that failed validation
    declined: int = 0  # clients that chose not to train (e.g. privacy budget spent)
    skipped: bool = False  # too few usable replies: the global adapter stayed as it was
    bytes_down: int = 0
    bytes_up: int = 0
    floats_down: int = 0
    floats_up: int = 0
    train_loss: float = float("nan")
    client_seconds: float = 0.0  # sum of clients' training-loop seconds
    aggregate_seconds: float = 0.0
    residual: float = float("nan")
    round_seconds: float = 0.0  # wall seconds from sending the round's messages to aggregating
    started: float = 0.0  # perf_counter() when the round's messages were built
    extra: dict[str, float] = field(default_factory=dict)
    client_ranks: list[int] = field(default_factory=list)  # the aggregated clients' ranks (heterogeneous methods)
    defence: dict[str, Any] = field(default_factory=dict)  # defence_* fields: who was capped, clipped, dropped
    client_errors: dict[int, str] = field(default_factory=dict)  # partition -> why its reply was an error
    eval_sent: int = 0  # evaluate messages sent this round (per-client evaluation; not a metrics.jsonl field)

    def begin(self, sampled: int) -> None:
        """The round's messages are being built for `sampled` clients: its clock starts."""
        self.started = time.perf_counter()
        self.sampled = sampled

    def record_aggregate(
        self, metrics: list[dict[str, float]], weights: list[float], residual: float, *, ranks: bool = False
    ) -> None:
        """The aggregated clients (`record_clients`), the aggregate's residual, and the round's wall seconds."""
        self.aggregated = len(metrics)
        self.residual = residual
        self.record_clients(metrics, weights, ranks=ranks)
        self.round_seconds = time.perf_counter() - self.started

    def fail(self, partition: int, reason: str | None) -> None:
        """An error reply (the ClientApp raised, or timed out) from the client of `partition`: counted in `failed`,
        its reason kept for the round's `client_errors` — the last `ERROR_CHARS` characters of a longer one, since
        a traceback (Ray's) ends with the exception and its message."""
        self.failed += 1
        reason = (reason or "no reason given").strip()
        self.client_errors[partition] = reason if len(reason) <= ERROR_CHARS else "…" + reason[-ERROR_CHARS:]

    def count_down(self, content: RecordDict) -> None:
        """Count one message's bytes and floats sent to a client."""
        self.bytes_down += array_bytes(content)
        self.floats_down += sum(num_floats(from_record(r)) for r in content.array_records.values())

    def skip(self, server_round: int, usable: int, needed: int) -> None:
        """Too few usable replies: the round aggregates nothing (warned once, with the config key to change)."""
        log.warning(
            "round %d: only %d usable replies (< sim.min_train_clients=%d); the global adapter stays as it was",
            server_round,
            usable,
            needed,
        )
        self.skipped = True
        self.round_seconds = time.perf_counter() - self.started

    def record_clients(self, metrics: list[dict[str, float]], weights: list[float], *, ranks: bool = False) -> None:
        """The aggregated clients' weighted training loss, their seconds and the ε they report (and, with `ranks`,
        the LoRA rank each trained at, in partition order)."""
        if ranks:
            self.client_ranks = [int(m[K.LORA_RANK]) for m in metrics if K.LORA_RANK in m]
        # DP clients do not report their training loss (an un-noised statistic of their data): NaN then.
        losses = [(w, m[K.TRAIN_LOSS]) for m, w in zip(metrics, weights, strict=True) if K.TRAIN_LOSS in m]
        if losses:
            self.train_loss = sum(w * v for w, v in losses) / sum(w for w, _ in losses)
        self.client_seconds = sum(m.get(K.TRAIN_SECONDS, 0.0) for m in metrics)
        eps = [m[K.EPSILON] for m in metrics if K.EPSILON in m]
        if eps:
            self.extra["epsilon_max"] = max(eps)
            self.extra["epsilon_mean"] = sum(eps) / len(eps)
        steps = [m[K.DP_STEPS] for m in metrics if K.DP_STEPS in m]
        if steps:  # DP steps each client's accountant has recorded (all rounds), and their σ
            self.extra["dp_steps_max"] = max(steps)
            self.extra["noise_multiplier_max"] = max(m.get(K.NOISE_MULTIPLIER, 0.0) for m in metrics)

    def record_evaluation(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """Per-client evaluation: the mean and spread over clients of the accuracy each scored on its own
        held-out share (unweighted: every client's model counts once), into this round's metrics."""
        scores: list[tuple[float, float]] = []
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: a client did not evaluate: %s", server_round, msg.error.reason)
                continue
            record = msg.content.metric_records.get(K.METRICS)
            m = scalars(record) if record is not None else {}
            acc, loss = m.get(K.EVAL_ACCURACY, float("nan")), m.get(K.EVAL_LOSS, float("nan"))
            if math.isfinite(acc):
                scores.append((acc, loss))
        fields: dict[str, float] = {
            K.CLIENTS_EVALUATED: len(scores),
            K.CLIENTS_EVAL_FAILED: self.eval_sent - len(scores),
        }
        if scores:
            accs = [a for a, _ in scores]
            fields[K.CLIENT_ACCURACY_MEAN] = statistics.fmean(accs)
            fields[K.CLIENT_ACCURACY_STD] = statistics.pstdev(accs)
            fields[K.CLIENT_ACCURACY_MIN] = min(accs)
            fields[K.CLIENT_ACCURACY_MAX] = max(accs)
            fields[K.CLIENT_LOSS_MEAN] = statistics.fmean(loss for _, loss in scores)
        self.extra.update(fields)
        return MetricRecord(fields)  # type: ignore[arg-type]

    def row(self) -> dict[str, Any]:
        """This round as metrics.jsonl fields."""
        return {
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "floats_up": self.floats_up,
            "floats_down": self.floats_down,
            "sampled": self.sampled,
            "replied": self.replied,
            "aggregated": self.aggregated,
            "failed": self.failed,
            "rejected": self.rejected,
            "declined": self.declined,
            "skipped": self.skipped,
            # None: a skipped round, or DP clients (they keep their un-noised training loss)
            "train_loss": None if math.isnan(self.train_loss) else self.train_loss,
            "residual": self.residual,
            "client_seconds": self.client_seconds,
            "aggregate_seconds": self.aggregate_seconds,
            "round_seconds": self.round_seconds,
            **({"client_ranks": self.client_ranks} if self.client_ranks else {}),
            **({"client_errors": self.client_errors} if self.client_errors else {}),
            **self.extra,
            **self.defence,
        }
