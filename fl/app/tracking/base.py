"""The tracker interface (also `tracking=none`: every call does nothing) and the run's plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def tag_pairs(tags: Sequence[str]) -> dict[str, str]:
    """`tracking.tags` ("key=value" strings) as a dict; raises ValueError naming the key on a bad one."""
    out: dict[str, str] = {}
    for tag in tags:
        key, sep, value = str(tag).partition("=")
        if not sep or not key:
            raise ValueError(f"tracking.tags entry {tag!r} is not key=value; write e.g. tracking.tags=['lr=0.01'].")
        out[key] = value
    return out


class Tracker:
    """What the ServerApp calls; a backend overrides each method. This base tracks nothing."""

    def log_params(self, params: Mapping[str, str]) -> None:
        """The flattened config, once at the start."""

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        """One round's numeric metrics at step = round."""

    def log_artifacts(self, adapter_dir: Path | None, plots: Sequence[Path]) -> None:
        """The exported adapter folder and the run's plots."""

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run (`status`: FINISHED or FAILED)."""


def plot_history(history: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """accuracy_vs_round.png (accuracy and loss per round) in `out_dir`; the plot artifact of a tracked run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [int(r["round"]) for r in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(rounds, [100 * float(r["accuracy"]) for r in history], marker="o", label="accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%)")
    loss_ax = ax.twinx()
    loss_ax.plot(rounds, [float(r["loss"]) for r in history], color="tab:orange", marker=".", label="loss")
    loss_ax.set_ylabel("held-out loss")
    fig.tight_layout()
    path = Path(out_dir) / "accuracy_vs_round.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
