"""The run's console: a live line while a round trains, one summary line per round.

While a round runs: clients done of sampled, local steps done, elapsed time and an ETA for the whole run
(from the pace so far: seconds per client reply, evaluations included, times the replies still to come).
On a terminal the line is redrawn in place (rich); when stdout is not a terminal (CI, `nohup`, a pipe)
plain lines are printed instead, at most one every `plain_interval` seconds, so a log stays short.

`ProgressGrid` wraps the ServerApp's Flower `Grid`: every reply the strategy waits for is counted as it
arrives, so no strategy knows about the console.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from typing import IO, Any, Protocol

from flwr.app import Message
from flwr.serverapp import Grid

from fl import constants as K


def clock(seconds: float) -> str:
    """Seconds as m:ss or h:mm:ss."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def summary_line(row: Mapping[str, Any], rounds: int) -> str:
    """One round's line: accuracy, loss, bytes up/down, ε (under DP), residual, wall time."""
    parts = [f"round {row['round']}/{rounds}", f"accuracy {100 * float(row['accuracy']):.2f}%"]
    parts.append(f"loss {float(row['loss']):.4f}")
    if "eval_examples" in row:
        parts[-1] += f" (on {row['eval_examples']} held out)"
    if "bytes_up" in row:
        parts.append(f"up {_mb(row['bytes_up'])} down {_mb(row.get('bytes_down', 0))}")
    if row.get("epsilon_max") is not None:
        parts.append(f"ε {float(row['epsilon_max']):.3g}")
    if row.get("residual") is not None:
        parts.append(f"residual {float(row['residual']):.2g}")
    parts.append(f"wall {clock(float(row.get('wall_seconds', 0.0)))}")
    return " · ".join(parts)


def _mb(n: Any) -> str:
    return f"{int(n) / 1e6:.2f} MB"


class Progress(Protocol):
    """What the ServerApp tells its console: `RunProgress` here, `fl.app.relay.ProgressFile` for fl-sim."""

    round: int

    def round_started(self, server_round: int, sampled: int, phase: str = K.PHASE_TRAIN) -> None: ...
    def reply(self, steps: int = 0) -> None: ...
    def round_done(self, row: Mapping[str, Any]) -> None: ...
    def print(self, line: str) -> None: ...
    def close(self) -> None: ...


class RunProgress:
    """Counts replies and rounds; draws the live line (terminal) or prints plain lines.

    Parameters
    ----------
    rounds : int
        Rounds of this run (the ETA's horizon).
    steps_per_client : int, optional
        Planned local steps per client and round (shown as "steps d/total"); None when they vary.
    live : bool, optional
        Redraw in place; default: whether `stream` is a terminal.
    stream : file, optional
        Where lines go (default stdout).
    plain_interval : float
        Seconds between plain progress lines (summary lines always print).
    """

    def __init__(
        self,
        *,
        rounds: int,
        steps_per_client: int | None = None,
        live: bool | None = None,
        stream: IO[str] | None = None,
        plain_interval: float = 30.0,
        start_round: int = 0,
    ) -> None:
        self.rounds = rounds
        self.steps_per_client = steps_per_client
        self.stream = stream or sys.stdout
        self.live = bool(self.stream.isatty()) if live is None else live
        self.plain_interval = plain_interval
        self.t0 = time.monotonic()
        self.round = start_round
        self.start_round = start_round
        self.phase = K.PHASE_TRAIN
        self.sampled = 0
        self.done = 0
        self.steps = 0
        self.replies_total = 0  # train replies received since the first training round began (the ETA's pace)
        self.t_train: float | None = None  # when the first training round began (start-up is not the pace)
        self._last_plain = -float("inf")
        self._live: Any = None
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self, console=Console(file=self.stream), refresh_per_second=2, transient=True)
            self._live.start()

    # ---------------------------------------------------------------- events
    def round_started(self, server_round: int, sampled: int, phase: str = K.PHASE_TRAIN) -> None:
        self.round, self.sampled, self.done, self.steps, self.phase = server_round, sampled, 0, 0, phase
        if phase == K.PHASE_TRAIN and self.t_train is None:
            self.t_train = time.monotonic()
        self._plain(force=True)

    def reply(self, steps: int = 0) -> None:
        self.done += 1
        self.steps += steps
        if self.phase == K.PHASE_TRAIN:
            self.replies_total += 1
        self._plain()

    def round_done(self, row: Mapping[str, Any]) -> None:
        self.print(summary_line(row, self.rounds))

    def print(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ---------------------------------------------------------------- the line
    def eta(self) -> float | None:
        """Seconds left: the pace per train reply so far times the replies still to come (None before one)."""
        if self.replies_total == 0 or self.sampled == 0 or self.t_train is None:
            return None
        pace = (time.monotonic() - self.t_train) / self.replies_total
        left = max(0, self.rounds - self.round) * self.sampled + (self.sampled - self.done)
        return pace * left

    def line(self) -> str:
        what = "Fed-SB init" if self.phase == K.PHASE_INIT_GRAD else f"round {self.round}/{self.rounds}"
        steps = f"steps {self.steps}"
        if self.steps_per_client and self.phase == K.PHASE_TRAIN:
            steps += f"/{self.steps_per_client * self.sampled}"
        eta = self.eta()
        return (
            f"{what} · clients {self.done}/{self.sampled} · {steps} · elapsed {clock(time.monotonic() - self.t0)}"
            f" · ETA {clock(eta) if eta is not None else '?'}"
        )

    def __rich__(self) -> str:  # rich's Live re-renders this twice a second
        return self.line()

    def _plain(self, force: bool = False) -> None:
        if self._live is not None:
            return
        now = time.monotonic()
        if force or now - self._last_plain >= self.plain_interval or self.done == self.sampled:
            self._last_plain = now
            print(self.line(), file=self.stream, flush=True)


class ProgressGrid(Grid):
    """A Flower `Grid` that reports each reply of `send_and_receive` to a `RunProgress` as it arrives.

    Everything else goes to the wrapped grid. The pull loop is Flower's own (`Grid.send_and_receive` of the
    in-memory and gRPC grids): push, then pull every `pull_interval` seconds until all replied or timeout."""

    pull_interval = 0.2

    def __init__(self, grid: Grid, progress: Progress) -> None:
        self.grid = grid
        self.progress = progress
        self.pull_interval = getattr(grid, "pull_interval", self.pull_interval)  # an inline grid answers at once

    def set_run(self, run: Any) -> None:  # the Grid ABC's methods, delegated
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        counted = [m for m in messages if m.metadata.message_type in ("train", "evaluate")]
        if counted:
            conf = counted[0].content.config_records.get(K.CONFIG)
            phase = str(conf.get(K.PHASE, K.PHASE_TRAIN)) if conf is not None else K.PHASE_TRAIN
            if counted[0].metadata.message_type == "evaluate":
                phase = K.PHASE_EVALUATE
            server_round = int(str(conf.get(K.SERVER_ROUND, 0))) if conf is not None else 0
            self.progress.round_started(server_round or self.progress.round, len(counted), phase)
        try:
            ids = set(self.push_messages(messages))
        except NotImplementedError:  # a grid that only answers whole batches (e.g. an in-process test grid)
            answered = list(self.grid.send_and_receive(messages, timeout=timeout))
            for reply in answered if counted else []:
                self.progress.reply(_steps(reply))
            return answered
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(ids))
            for reply in got:
                if counted:
                    self.progress.reply(_steps(reply))
            replies.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not ids:
                break
            time.sleep(self.pull_interval)
        return replies


def _steps(reply: Message) -> int:
    if reply.has_error():
        return 0
    metrics = reply.content.metric_records.get(K.METRICS)
    return int(metrics.get(K.TRAIN_STEPS, 0)) if metrics is not None else 0  # type: ignore[arg-type]
