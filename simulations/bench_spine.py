"""Benchmark the spine, in one run: local-training throughput vs a bare PyTorch+PEFT loop, and the
simulation overhead of Flower's Simulation Runtime.

Usage::

    bash dev.sh python -m simulations.bench_spine [--steps 30] [--clients 4] [--rounds 2]

Prints two ratios, measured now on this machine:

1. throughput ratio = (bare loop seconds per step) / (framework `local_train` seconds per step) on the
   same model, data and batches (goal >= 0.95). The two loops alternate in chunks so machine noise
   hits both alike.
2. simulation overhead = (round wall − Σ client training seconds) / round wall, summed over rounds
   (goal <= 10%), with one client at a time (`sim.client_cpus=2`) so client compute does not overlap.
   Central evaluation on the server is timed separately and reported, not counted as overhead;
   the whole job's wall time (Ray start-up, model loading, evaluation) is reported too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from clients.train import local_train, make_loader
from fl.adapters import build_adapter
from fl.app.workspace import get_workspace
from fl.data import IndexedDataset
from fl.outputs import read_metrics
from fl.runtime_env import set_quiet_env
from fl.tasks import load_base_model


def bare_loop(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float) -> float:
    """A plain PyTorch+PEFT training loop over pre-built batches; returns seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    t0 = time.perf_counter()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t0


def throughput(steps: int, chunks: int) -> dict[str, float]:
    """Framework local_train vs a bare loop on the same batches (default model)."""
    ws = get_workspace(["train.batch_size=16"])
    cfg = ws.cfg
    data = IndexedDataset(ws.task.train, torch.arange(4000).numpy())
    bare_model = build_adapter(
        load_base_model(cfg.model, num_labels=ws.num_labels, seed=0),
        kind="lora",
        strategy_cfg=cfg.strategy,
        targets=list(cfg.model.target_modules),
        seed=0,
    )
    fw_s, bare_s = 0.0, 0.0
    warm = make_loader(data, batch_size=16, pad_id=ws.pad_id, seed=99)
    bare_loop(bare_model, [next(iter(warm))] * 3, float(cfg.strategy.lr))  # warm-up, not timed
    local_train(ws.model, data, steps=3, batch_size=16, lr=1e-9, weight_decay=0.0, pad_id=ws.pad_id, seed=99)
    for chunk in range(chunks):
        seed = 100 + chunk
        loader = make_loader(data, batch_size=16, pad_id=ws.pad_id, seed=seed)
        it = iter(loader)
        batches = [next(it) for _ in range(steps)]  # the batches local_train will draw
        bare_s += bare_loop(bare_model, batches, float(cfg.strategy.lr))
        res = local_train(
            ws.model,
            data,
            steps=steps,
            batch_size=16,
            lr=float(cfg.strategy.lr),
            weight_decay=0.0,
            pad_id=ws.pad_id,
            seed=seed,
        )
        fw_s += res.seconds
    n = steps * chunks
    return {
        "framework_s_per_step": fw_s / n,
        "bare_s_per_step": bare_s / n,
        "throughput_ratio": bare_s / fw_s,
    }


def overhead(clients: int, rounds: int, steps: int) -> dict[str, float]:
    """Simulation overhead of a default-model run with one client at a time."""
    from fl.app.simulation import run_simulation

    run_dir = Path(tempfile.mkdtemp()) / "run"
    t0 = time.perf_counter()
    run_simulation(
        [
            f"sim.num_clients={clients}",
            f"sim.rounds={rounds}",
            "sim.client_cpus=2",
            f"train.local_steps={steps}",
            "data.partitioner=iid",
            "train.precision=fp32",  # as recorded
            f"run_dir={run_dir}",
        ]
    )
    job_wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(run_dir) if r["round"] > 0]
    round_wall = sum(r["round_seconds"] for r in rows)
    compute = sum(r["client_seconds"] for r in rows)
    return {
        "round_wall_s": round_wall,
        "client_compute_s": compute,
        "simulation_overhead": (round_wall - compute) / round_wall,
        "central_eval_s": sum(r["eval_seconds"] for r in read_metrics(run_dir)),
        "job_wall_s": job_wall,
        "job_overhead_incl_startup_and_eval": (job_wall - compute) / job_wall,
    }


def main() -> None:
    set_quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="steps per chunk (throughput)")
    ap.add_argument("--chunks", type=int, default=4, help="alternating chunks (throughput)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=20)
    args = ap.parse_args()
    result = {"throughput": throughput(args.steps, args.chunks)}
    result["simulation"] = overhead(args.clients, args.rounds, args.local_steps)
    print(json.dumps(result, indent=2))
    t, s = result["throughput"], result["simulation"]
    print(
        f"\nthroughput ratio (bare / framework s per step): {t['throughput_ratio']:.3f}  (goal >= 0.95)"
        f"\nsimulation overhead (round wall - client compute) / round wall: {s['simulation_overhead']:.1%}"
        "  (goal <= 10%)"
    )


if __name__ == "__main__":
    main()
