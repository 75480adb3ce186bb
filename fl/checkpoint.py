"""Server checkpoints: after every round, everything needed to continue the run exactly.

A checkpoint holds the round number, the global arrays, the strategy's server state (its sampling RNG,
frozen factors such as Fed-SB's A and B or FFA's A), the metrics rows so far and the overrides the run
was composed from. It is written to a temporary file and renamed, so a crash mid-write leaves the
previous checkpoint intact. `fl-sim resume=<run folder>` loads it and continues from the next round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "fedlora-checkpoint-v1"


@dataclass
class Checkpoint:
    """The state of a run after `round` complete rounds."""

    round: int
    arrays: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]
    history: list[dict[str, Any]]
    overrides: list[str]

    def save(self, run_dir: str | Path) -> Path:
        """Write atomically to `<run_dir>/checkpoint.pt`."""
        path = Path(run_dir) / CHECKPOINT_FILE
        tmp = path.with_name(f".{CHECKPOINT_FILE}.tmp{os.getpid()}")
        torch.save({"format": FORMAT, **self.__dict__}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> Checkpoint:
        """Read `<run_dir>/checkpoint.pt`; a clear error if it is missing or not a checkpoint."""
        path = Path(run_dir) / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"resume={str(run_dir)!r}: no {CHECKPOINT_FILE} there. Give the folder of a run that "
                "completed at least one round."
            )
        data = torch.load(path, weights_only=False)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"resume={str(run_dir)!r}: {path} is not a {FORMAT} file.")
        data.pop("format")
        return cls(**data)
