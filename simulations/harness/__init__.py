"""The benchmark harness: what every ``simulations.bench_*`` script shares, so a benchmark holds only its grid and
its reading.

- `cli`: the parser (described by the benchmark's docstring), the flags benchmarks share (federation size, timing
  chunks, seeds, extra overrides, the tiny-model smoke path) and the federation's common overrides;
- `runs`: the one runner of a simulation in this process (resumable in a given folder), and sweeps of `fl-sim`
  processes on `simulations.sweep`;
- `timing`: the DP-SGD wrapper of a timed round, timed rounds of `local_train`, arms alternated in chunks, peak
  memory;
- `results`: JSON, JSON lines and markdown tables written the same way everywhere, mean ± sample std.
"""

from simulations.harness.cli import (
    TINY,
    add_extra,
    add_federation,
    add_seeds,
    add_timing,
    add_tiny,
    federation,
    parse,
    parser,
)
from simulations.harness.results import (
    append_jsonl,
    md_table,
    mean_std,
    read_jsonl,
    write_json,
    write_report,
    write_text,
)
from simulations.harness.runs import Run, finished_cells, named_sweep, run_cases, simulate

__all__ = [
    "TINY",
    "Run",
    "add_extra",
    "add_federation",
    "add_seeds",
    "add_timing",
    "add_tiny",
    "append_jsonl",
    "federation",
    "finished_cells",
    "md_table",
    "mean_std",
    "named_sweep",
    "parse",
    "parser",
    "read_jsonl",
    "run_cases",
    "simulate",
    "write_json",
    "write_report",
    "write_text",
]
