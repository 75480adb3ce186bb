"""Server checkpoints: after every round, everything needed to continue the run exactly.

A checkpoint holds the round number, the global arrays, the strategy's server state (its sampling RNG,
frozen factors such as Fed-SB's A and B or FFA's A, defence and optimizer state), the metrics rows so far
and the overrides the run was composed from.

Safe to load: only tensors and plain data (dicts, lists, tuples, sets, strings, numbers, booleans, None) are
saved, and `load` reads them with `torch.load(weights_only=True)`, which builds nothing else, so a
checkpoint from elsewhere cannot run code. Numpy scalars are stored as Python numbers and numpy arrays as
tensors; any other object is refused when the checkpoint is written, naming where it sits.

Safe to interrupt: each checkpoint is written to a temporary file, flushed to disk and renamed over
`checkpoint.pt`, so a kill mid-write leaves the previous one intact; the one before it stays as
`checkpoint.prev.pt` (a hard link: no copy is made), in case `checkpoint.pt` itself is later damaged.
`fl-sim resume=<run folder>` loads it and continues from the next round.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "checkpoint.prev.pt"
FORMAT = "fedlora-checkpoint-v2"
READABLE = (FORMAT, "fedlora-checkpoint-v1")  # v1 had the same fields; one holding no Python objects still loads
_FIELDS = ("round", "arrays", "strategy_state", "history", "overrides")
_PLAIN = (str, int, float, bool, bytes, type(None))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (damaged, not ours, or holding objects); the message says what to do."""


@dataclass
class Checkpoint:
    """The state of a run after `round` complete rounds."""

    round: int
    arrays: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    history: list[dict[str, Any]]
    overrides: list[str]

    def save(self, run_dir: str | Path) -> Path:
        """Write to `<run_dir>/checkpoint.pt` by write-then-rename, keeping the one before as checkpoint.prev.pt.

        Raises
        ------
        TypeError
            If the state holds anything but tensors and plain data (the path to it is named).
        """
        path = Path(run_dir) / CHECKPOINT_FILE
        payload = plain({"format": FORMAT, **{k: getattr(self, k) for k in _FIELDS}}, "checkpoint")
        tmp = path.with_name(f".{CHECKPOINT_FILE}.tmp{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            if path.is_file():  # the current one becomes the previous (the rename below is the commit point)
                link = path.with_name(f".{PREVIOUS_FILE}.tmp{os.getpid()}")
                link.unlink(missing_ok=True)
                try:
                    os.link(path, link)
                except OSError:  # a file system without hard links: a copy
                    shutil.copyfile(path, link)
                os.replace(link, path.with_name(PREVIOUS_FILE))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, run_dir: str | Path, *, name: str = CHECKPOINT_FILE) -> Checkpoint:
        """Read `<run_dir>/<name>` without executing code.

        Raises
        ------
        FileNotFoundError
            If there is no such file.
        CheckpointError
            If it is damaged (e.g. truncated), not a checkpoint, or holds Python objects; the message is one
            line naming the file and what to do next.
        """
        path = Path(run_dir) / name
        where = f"resume={str(run_dir)!r}"
        if not path.is_file():
            raise FileNotFoundError(
                f"{where}: no {name} there. Give the folder of a run that completed at least one round."
            )
        data, problem = _read(path)
        if problem is None and not (isinstance(data, dict) and data.get("format") in READABLE):
            problem = f"is not a checkpoint (no {FORMAT} tag)"
        if problem is not None:  # raised here, not in an except block: the one line carries no library chain
            raise CheckpointError(f"{where}: {path} {problem}. {_what_next(Path(run_dir), name)}")
        return cls(**{k: data[k] for k in _FIELDS})


def _read(path: Path) -> tuple[Any, str | None]:
    """The unpickled data or None, and why it could not be read (None when it could)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            return None, (
                "holds Python objects that a safe load does not build (an older checkpoint format, or a file "
                "not written by fedlora), so it is not loaded"
            )
        return None, f"is damaged ({_short(e)})"
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, IndexError… on torn files
        return None, f"is damaged: truncated or corrupt ({_short(e)})"


def _what_next(run_dir: Path, name: str) -> str:
    """The way on from an unreadable checkpoint: the previous one if it is sound, or a fresh start."""
    start = "start the run again without resume= (and a new run_dir=)"
    if name == CHECKPOINT_FILE and (run_dir / PREVIOUS_FILE).is_file():
        try:
            prev = Checkpoint.load(run_dir, name=PREVIOUS_FILE)
        except (CheckpointError, FileNotFoundError):
            return f"{run_dir / PREVIOUS_FILE} cannot be read either: {start}."
        return (
            f"The previous checkpoint {run_dir / PREVIOUS_FILE} (round {prev.round}) is sound: copy it over "
            f"{CHECKPOINT_FILE} to resume after round {prev.round}, or {start}."
        )
    return f"No earlier checkpoint is kept: {start}."


def _short(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    first = first.split(". ")[0][:120]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def plain(value: Any, where: str) -> Any:
    """`value` as tensors and plain data only (numpy scalars → Python numbers, numpy arrays → tensors).

    Raises
    ------
    TypeError
        For any other object, naming `where` it sits (e.g. ``checkpoint.strategy_state['opt']['m']``).
    """
    if isinstance(value, np.generic):  # before the plain types: np.float64 is a float
        return value.item()
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        return {plain(k, f"{where} key {k!r}"): plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items) if isinstance(value, tuple) else set(items)
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint holds only tensors, "
        "numbers, strings, booleans, None and lists/tuples/sets/dicts of them (give the object a state_dict())."
    )
