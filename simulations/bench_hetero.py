"""The heterogeneous-ranks benchmark: FLoRA, FlexLoRA and HetLoRA with client ranks drawn from
{2, 4, 8, 16} against FedIT at r=2 and at r=16 (configs/sweep/hetero.yaml), then fl-report's tables.

Resumable: it is `fl-sweep sweep=hetero` on a fixed folder, so re-running skips the finished cells. Extra
arguments are overrides added to every cell (e.g. a smoke run: ``model=tiny data.max_examples=300
sim.rounds=2 train.local_steps=2 sim.num_clients=4``)::

    python -m simulations.bench_hetero --dir multirun/hetero            # the benchmark (MiniLM, ~1.5 h)
    python -m simulations.bench_hetero --dir /tmp/h model=tiny sim.rounds=2 train.local_steps=2

Read seeds.md (final accuracy mean ± std per method), report.csv (uplink, downlink, server seconds per run).
"""

from __future__ import annotations

from collections.abc import Sequence

from simulations import harness, report


def main(argv: Sequence[str] | None = None) -> None:
    """Run (or resume) the grid, then write the report into the same folder."""
    root = harness.named_sweep(__doc__, "hetero", default_dir="multirun/hetero", argv=argv)
    report.main([str(root)])


if __name__ == "__main__":
    main()
