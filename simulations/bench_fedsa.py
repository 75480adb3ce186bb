"""FedSA-LoRA's personalised accuracy against FedIT's global model on the same client test shares.

FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463) keeps each client's B at home, so its claim is about the
model each client ends with, not the server's. `configs/sweep/fedsa.yaml` runs FedSA-LoRA and FedIT on the same
federation (MiniLM, tweets, 10 clients, Dirichlet α=0.5, 10 rounds × 10 local steps, 3 seeds); every client holds
out a seeded 10% of its partition and scores, every round, the model it would keep. This script runs (or
resumes) that sweep and writes ``fedsa.md``: per method, the final round's client accuracy (mean over clients,
its spread over clients, worst and best client) and the central accuracy, each as mean ± sample std over seeds.

    python -m simulations.bench_fedsa --dir multirun/fedsa            # the benchmark (MiniLM)
    python -m simulations.bench_fedsa --dir /tmp/f model=tiny data.max_examples=400 sim.rounds=2 \
        train.local_steps=2 sim.num_clients=4 data.test_size=50            # a smoke run of the path
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fl import constants as K
from simulations import harness
from strategies import get_strategy

COLUMNS = (
    ("client accuracy, mean over clients", K.CLIENT_ACCURACY_MEAN),
    ("spread over clients (std)", K.CLIENT_ACCURACY_STD),
    ("worst client", K.CLIENT_ACCURACY_MIN),
    ("best client", K.CLIENT_ACCURACY_MAX),
    ("central accuracy (server's model)", "accuracy"),
)


def finals(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Each method's final metrics row per finished cell (seed), by the method's report title."""
    out: dict[str, list[dict[str, Any]]] = {}
    for cfg, rows in harness.finished_cells(root):
        out.setdefault(get_strategy(str(cfg.strategy.name)).describe(cfg.strategy), []).append(rows[-1])
    return out


def table(by_method: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per method, mean ± sample std over seeds (n) of each column."""
    lines = []
    for method, rows in by_method.items():
        cells = []
        for _, key in COLUMNS:
            xs = np.array([r[key] for r in rows if r.get(key) is not None], dtype=float)
            if xs.size == 0:
                cells.append("n/a")
                continue
            mean, std = harness.mean_std(xs)
            cells.append(f"{100 * mean:.2f} ± {100 * (std if xs.size > 1 else 0.0):.2f}")  # one seed: ± 0
        lines.append([method, len(rows), *cells])
    return harness.md_table(["method", "n", *(c for c, _ in COLUMNS)], lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run (or resume) the sweep, then write `<dir>/fedsa.md` and `fedsa.json`."""
    root = harness.named_sweep(__doc__, "fedsa", default_dir="multirun/fedsa", argv=argv)
    by_method = finals(root)
    text = "Final round, in %; each cell mean ± sample std over seeds.\n\n" + table(by_method)
    harness.write_text(root / "fedsa.md", text)
    harness.write_json(root / "fedsa.json", by_method, default=float)
    print(text)


if __name__ == "__main__":
    main()
