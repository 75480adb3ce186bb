"""Fed-SB's initialisations on the default federation: round-0 uplink, total uplink, accuracy per round.

Usage::

    python -m simulations.bench_init [--rounds 5] [--local-steps 10] [--test-size 500]

Every run trains clients the same way (10 clients, Dirichlet α=0.5, every client every round, equal rounds and
local steps; Fed-SB r=32 at lr 1e-2 and FedIT r=8 at lr 3e-3, the rates tuned for the methods benchmark in
BENCHMARKS.md). Fed-SB
starts from init = federated (dense, the paper's), sketch (Halko, Martinsson & Tropp 2011), sketch with
init_fraction 0.3, server (a server-side file of tweets from the training pool, the authors' pooled-data
setting; never the held-out split) and random. A probe first compares the dense and the sketched init on the
same summed gradient (no Flower). Resumable: a run whose folder holds summary.json is not run again.
Writes `<out>.md` and `<out>.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulations import harness

FEDSB = ["strategy=fed_sb", "strategy.rank=32", "strategy.lr=1e-2"]
FEDIT = ["strategy=fedit", "strategy.rank=8", "strategy.lr=3e-3"]
RUNS: list[tuple[str, str, list[str]]] = [  # (slug, label, overrides); {init_data} is filled in
    ("dense", "Fed-SB r=32 init=federated (dense)", [*FEDSB, "strategy.init=federated"]),
    ("sketch", "Fed-SB r=32 init=sketch (p=8)", [*FEDSB, "strategy.init=sketch"]),
    ("fedit", "FedIT r=8", FEDIT),
    (
        "sketch-f03",
        "Fed-SB r=32 init=sketch, init_fraction=0.3",
        [*FEDSB, "strategy.init=sketch", "strategy.init_fraction=0.3"],
    ),
    (
        "server",
        "Fed-SB r=32 init=server (640 pooled tweets)",
        [*FEDSB, "strategy.init=server", "strategy.init_data={init_data}"],
    ),
    ("random", "Fed-SB r=32 init=random", [*FEDSB, "strategy.init=random"]),
    ("sketch-p0", "Fed-SB r=32 init=sketch, p=0", [*FEDSB, "strategy.init=sketch", "strategy.sketch_oversample=0"]),
    (
        "sketch-q1",
        "Fed-SB r=32 init=sketch, 1 power iteration",
        [*FEDSB, "strategy.init=sketch", "strategy.sketch_power_iters=1"],
    ),
]


def server_file(common: list[str], path: Path, *, count: int) -> Path:
    """`count` tweets from the training pool (the held-out test split excluded, as `build_task_data` splits)."""
    from fl.app.config import compose
    from fl.data import load_pool

    if path.is_file():
        return path
    cfg = compose(["strategy=fed_sb", *common])
    pool = load_pool(cfg.data).to_pandas()
    order = np.random.default_rng(int(cfg.seed)).permutation(len(pool))
    train_idx = order[int(cfg.data.test_size) :]
    pick = np.random.default_rng(12345).choice(train_idx, size=count, replace=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = pool.iloc[np.sort(pick)][[cfg.data.text_column, cfg.data.label_column]]
    rows.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


def probe(common: list[str], *, clients: int) -> dict[str, Any]:
    """Dense vs sketched init on the same G = Σ_k G_k (each client's 64 init examples), per module."""
    from clients.fedsb_init import BASE_SUFFIX, gradient_sum, init_examples
    from fl.app.workspace import get_workspace
    from fl.data import IndexedDataset, client_partition
    from strategies.lora_math import fedsb_init_factors
    from strategies.sketch_math import range_finder, sketch_factors, sketch_width, test_matrix

    ws = get_workspace(["strategy=fed_sb", "strategy.rank=32", *common])
    cfg = ws.cfg
    total: dict[str, torch.Tensor] = {}
    for pid in range(clients):
        idx = client_partition(ws.task, cfg.data, pid=pid, num_partitions=clients, seed=int(cfg.seed))
        sub = init_examples(
            IndexedDataset(ws.task.train, idx), count=int(cfg.strategy.init_examples), seed=int(cfg.seed) + pid
        )
        for n, g in gradient_sum(ws.model, sub, batch_size=16, pad_id=ws.pad_id).items():
            total[n] = total[n] + g.double() if n in total else g.double()
    rank, lr = int(cfg.strategy.rank), float(cfg.strategy.init_lr)
    dense = {n: fedsb_init_factors(g.float(), rank=rank, lr=lr) for n, g in total.items()}
    out: dict[str, Any] = {"modules": {n: list(g.shape) for n, g in total.items()}}
    for q in (0, 1):
        omega = {
            n: test_matrix(g.shape[1], sketch_width(*g.shape, rank=rank, oversample=8), seed=0, name=n)
            for n, g in total.items()
        }
        y = {n: total[n] @ omega[n] for n in total}
        basis, proj = range_finder(
            y,
            left=lambda m: {n: total[n].T @ m[n] for n in m},
            right=lambda m: {n: total[n] @ m[n] for n in m},
            power_iters=q,
        )
        rows = []
        for n, g in total.items():
            a_s, b_s, r_s = sketch_factors(basis[n], proj[n], rank=rank, lr=lr)
            a_d, b_d, r_d = dense[n]
            u, _, _ = torch.linalg.svd(g, full_matrices=False)
            rows.append(
                {
                    "module": n[: -len(BASE_SUFFIX)],
                    "B_overlap_dense": float((b_d.double().T @ b_s.double()).pow(2).sum()) / rank,
                    "A_overlap_dense": float((a_d.double() @ a_s.double().T).pow(2).sum()) / rank,
                    "B_overlap_topG": float((u[:, :rank].T @ b_s.double()).pow(2).sum()) / rank,
                    "dense_overlap_topG": float((u[:, :rank].T @ b_d.double()).pow(2).sum()) / rank,
                    "R0_norm_ratio": float(r_s.norm() / r_d.norm()),
                }
            )
        keys = [k for k in rows[0] if k != "module"]
        out[f"power_iters={q}"] = {
            "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
            "min": {k: float(np.min([r[k] for r in rows])) for k in keys},
            "max": {k: float(np.max([r[k] for r in rows])) for k in keys},
        }
    return out


def formula_ratios(shapes: dict[str, list[int]], *, rank: int = 32, oversample: int = 8) -> dict[str, Any]:
    """(r+p)(d_in+d_out)/(d_in·d_out) per module shape, the whole model, and a 4096 × 4096 layer."""
    from strategies.sketch_math import uplink_ratio

    per_shape = {f"{o}x{i}": uplink_ratio(o, i, rank=rank, oversample=oversample) for o, i in shapes.values()}
    dense = sum(o * i for o, i in shapes.values())
    sketch = sum(uplink_ratio(o, i, rank=rank, oversample=oversample) * o * i for o, i in shapes.values())
    return {
        "per_shape": per_shape,
        "model": sketch / dense,
        "4096x4096": uplink_ratio(4096, 4096, rank=rank, oversample=oversample),
    }


def run_one(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """One run (read, not run again, when its folder holds summary.json): uplink, downlink, accuracy, wall time."""
    run = harness.simulate(overrides, run_dir=run_dir)
    print(f"finished {run_dir} in {run.wall_s:.0f} s", flush=True)
    first, last = run.rows[0], run.final
    return {
        "round0_up_MB": first.get("bytes_up", 0) / 1e6,
        "round0_down_MB": first.get("bytes_down", 0) / 1e6,
        "cum_up_MB": last["cum_bytes_up"] / 1e6,
        "cum_down_MB": last["cum_bytes_down"] / 1e6,
        "final_acc": last["accuracy"],
        "acc": [round(r["accuracy"], 4) for r in run.rows],
        "wall_s": run.summary["wall_seconds"],
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per run."""
    head = [
        "run",
        "round-0 up MB",
        "round-0 down MB",
        "total up MB",
        "total down MB",
        "final acc",
        "acc per round (0..R)",
        "wall s",
    ]
    return harness.md_table(
        head,
        (
            [
                r["label"],
                f"{r['round0_up_MB']:.2f}",
                f"{r['round0_down_MB']:.2f}",
                f"{r['cum_up_MB']:.1f}",
                f"{r['cum_down_MB']:.1f}",
                f"{r['final_acc']:.4f}",
                " ".join(f"{a:.3f}" for a in r["acc"]),
                f"{r['wall_s']:.0f}",
            ]
            for r in results.values()
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """The probe, then every run (resumable); `<out>.md`, `<out>.json` and plots after each run."""
    ap = harness.parser(__doc__)
    harness.add_federation(ap, rounds=5, local_steps=10, clients=10, test_size=500)
    ap.add_argument("--work", default="outputs/bench_init", help="run folders (resumable) and the probe")
    ap.add_argument("--out", default="docs/init")
    ap.add_argument("--only", nargs="*", help="run only these slugs (default: all)")
    harness.add_extra(ap)
    args = harness.parse(ap, argv)
    common = harness.federation(args)  # the recorded figures: constant rate, fp32 (--extra overrides)
    work = Path(args.work).resolve()
    out = Path(args.out)
    probe_path = work / "probe.json"
    if not probe_path.is_file():
        harness.write_json(probe_path, probe(common, clients=args.clients))
    probed = json.loads(probe_path.read_text())
    ratios = formula_ratios(probed["modules"])
    print(json.dumps({k: v for k, v in probed.items() if k != "modules"}, indent=2), json.dumps(ratios), flush=True)
    init_data = server_file(common, work / "server_init.jsonl", count=64 * args.clients)
    results: dict[str, dict[str, Any]] = {}
    for slug, label, extra in RUNS:
        done = (work / slug / "run" / "summary.json").is_file()
        if args.only and slug not in args.only and not done:  # finished runs stay in the table
            continue
        overrides = [o.replace("{init_data}", str(init_data)) for o in extra] + common
        results[slug] = {"label": label, "overrides": overrides, **run_one(overrides, work / slug / "run")}
        md = table(results)
        print(md, flush=True)
        harness.write_report(
            out,
            markdown=f"Config: {' '.join(common)}\n\n" + md,
            data={"common": common, "probe": probed, "ratios": ratios, "results": results},
        )
    from simulations.report import load_runs, plot_accuracy_vs_round, plot_accuracy_vs_uplink

    plots = Path(f"{out}-plots")
    plots.mkdir(parents=True, exist_ok=True)
    runs = [r for r in load_runs(work) if r["run"].split("/")[0] in results]
    print(plot_accuracy_vs_uplink(runs, plots), plot_accuracy_vs_round(runs, plots))


if __name__ == "__main__":
    main()
