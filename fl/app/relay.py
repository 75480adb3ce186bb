"""The progress relay: the ServerApp's console events, written where the process that shows them can read them.

On Flower's Simulation Runtime the ServerApp runs in `flwr-simulation`, a process the SuperLink starts, so
its console is not the user's. When `PROGRESS_ENV` names a file, the ServerApp's `RunProgress` is a
`ProgressFile` instead: the same events (a round started, a client replied, a round's summary, a line to
print) and our loggers' records, appended as JSON lines. `fl-sim` tails that file (`ProgressReader`) and
replays each event into its own `RunProgress`, so the live line, the ETA and the summary lines are what an
in-process run shows.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from fl import constants as K
from fl.app.console import OUR_LOGGERS, set_levels
from fl.app.progress import RunProgress

PROGRESS_ENV = "FEDLORA_PROGRESS_FILE"  # set by fl-sim for the ServerApp's process
LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")


class ProgressFile:
    """`RunProgress`'s events as JSON lines in `path` (line-buffered: each event is on disk when it happens).

    While open, the records of our loggers go to the same file (`log` events), formatted as `fl-sim` does.
    """

    def __init__(
        self, path: Path, *, rounds: int, steps_per_client: int | None, start_round: int, log_level: str = "info"
    ) -> None:
        set_levels(log_level)  # this process is Flower's: our loggers at `log_level`, Flower's quiet
        self.round = start_round
        self._out: IO[str] | None = Path(path).open("a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._handler = _EventHandler(self)
        for name in OUR_LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
            logging.getLogger(name).propagate = False  # not also into Flower's captured stdout
        self.emit("start", rounds=rounds, steps_per_client=steps_per_client, start_round=start_round)

    def emit(self, event: str, **fields: Any) -> None:
        if self._out is not None:
            self._out.write(json.dumps({"event": event, **fields}, default=str) + "\n")

    def round_started(self, server_round: int, sampled: int, phase: str = K.PHASE_TRAIN) -> None:
        self.round = server_round
        self.emit("round_started", server_round=server_round, sampled=sampled, phase=phase)

    def reply(self, steps: int = 0) -> None:
        self.emit("reply", steps=steps)

    def round_done(self, row: Mapping[str, Any]) -> None:
        self.emit("round_done", row=dict(row))

    def print(self, line: str) -> None:
        self.emit("print", line=line)

    def close(self) -> None:
        for name in OUR_LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)
        if self._out is not None:
            self.emit("close")
            self._out.close()
            self._out = None


class _EventHandler(logging.Handler):
    def __init__(self, sink: ProgressFile) -> None:
        super().__init__()
        self.sink = sink
        self.setFormatter(LOG_FORMAT)

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.emit("log", line=self.format(record))


def run_progress(
    *, rounds: int, steps_per_client: int | None, start_round: int, log_level: str = "info"
) -> RunProgress | ProgressFile:
    """The ServerApp's progress: to the file `PROGRESS_ENV` names (fl-sim), else on this process's console."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        return ProgressFile(
            Path(path), rounds=rounds, steps_per_client=steps_per_client, start_round=start_round, log_level=log_level
        )
    return RunProgress(rounds=rounds, steps_per_client=steps_per_client, start_round=start_round)


class ProgressReader:
    """Tails a `ProgressFile` and replays its events into a `RunProgress` made on its `start` event.

    Call `poll()` as often as the console should move; `closed` is True once the ServerApp closed its
    progress (the run's end, or its failure). Log lines go to stderr (through the live display on a terminal).
    """

    def __init__(self, path: Path, *, stream: IO[str] | None = None) -> None:
        self.path = Path(path)
        self.stream = stream
        self.offset = 0
        self.progress: RunProgress | None = None
        self.closed = False

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete, _, _ = chunk.rpartition("\n")  # a line still being written waits for the next poll
        if not complete:
            return
        self.offset += len((complete + "\n").encode("utf-8"))
        for line in complete.splitlines():
            self._replay(json.loads(line))

    def _replay(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "start":
            self.close()
            self.closed = False
            self.progress = RunProgress(
                rounds=int(ev["rounds"]),
                steps_per_client=ev.get("steps_per_client"),
                start_round=int(ev.get("start_round", 0)),
                stream=self.stream,
            )
            return
        p = self.progress
        if kind == "log":
            if p is not None and p.live:
                p.print(str(ev["line"]))
            else:
                print(ev["line"], file=sys.stderr, flush=True)
        elif p is None:
            return
        elif kind == "round_started":
            p.round_started(int(ev["server_round"]), int(ev["sampled"]), str(ev["phase"]))
        elif kind == "reply":
            p.reply(int(ev.get("steps", 0)))
        elif kind == "round_done":
            p.round_done(ev["row"])
        elif kind == "print":
            p.print(str(ev["line"]))
        elif kind == "close":
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.closed = True
