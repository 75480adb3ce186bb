"""Writing a benchmark's results: JSON, JSON lines (one finished cell a line), markdown tables, mean ± std."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def mean_std(values: npt.ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; nan for a single value), as fl-report's seeds table."""
    xs = np.asarray(values, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else float("nan")


def md_table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table: a header row, its rule, one line per row (cells already formatted), a final newline."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path`, making its folder first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_json(path: str | Path, data: Any, *, default: Callable[[Any], Any] | None = None) -> Path:
    """`data` as indented JSON in `path` (folder made first)."""
    return write_text(path, json.dumps(data, indent=2, default=default) + "\n")


def write_report(out: str | Path, *, markdown: str, data: Any) -> None:
    """``<out>.md`` (the tables a reader reads) and ``<out>.json`` (every figure behind them)."""
    out = Path(out)
    write_text(out.with_suffix(".md"), markdown)
    write_json(out.with_suffix(".json"), data)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSON-lines file (none when it does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one row: a run stopped part-way keeps every row written before it (resumable grids)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
