"""Benchmark the spine, in one run: local-training throughput vs a bare PyTorch+PEFT loop, and the
simulation overhead of Flower's Simulation Runtime.

Usage::

    bash dev.sh python -m simulations.bench_spine [--steps 30] [--clients 4] [--rounds 2]

Prints two ratios, measured now on this machine:

1. throughput ratio = (bare loop seconds per step) / (framework `local_train` seconds per step) on the
   same model, data and batches (goal >= 0.95). The two loops alternate in chunks, in reversed order
   every other chunk, so machine noise hits both alike.
2. simulation overhead = (round wall − Σ client training seconds) / round wall, summed over rounds
   (goal <= 10%), with one client at a time (`sim.client_cpus=2`) so client compute does not overlap.
   Central evaluation on the server is timed separately and reported, not counted as overhead;
   the whole job's wall time (Ray start-up, model loading, evaluation) is reported too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import torch

from clients.train import make_loader
from fl.adapters import build_adapter
from fl.tasks import load_base_model
from simulations import harness
from simulations.harness.timing import Trainer, alternate


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
    t = Trainer(["train.batch_size=16"], batch=16, examples=4000)
    ws, cfg = t.ws, t.ws.cfg
    t.lr = float(cfg.strategy.lr)
    bare_model = build_adapter(
        load_base_model(cfg.model, num_labels=ws.num_labels, seed=0),
        kind="lora",
        strategy_cfg=cfg.strategy,
        targets=list(cfg.model.target_modules),
        seed=0,
    )

    def run(arm: str, chunk: int) -> float:
        if arm == "framework":
            return t.round(steps, 100 + chunk).seconds
        it = iter(make_loader(t.data, batch_size=16, pad_id=ws.pad_id, seed=100 + chunk))
        return bare_loop(bare_model, [next(it) for _ in range(steps)], t.lr)  # the batches local_train draws

    def warmup(arm: str) -> None:  # not timed
        if arm == "framework":
            t.round(3, 99)
        else:
            bare_loop(bare_model, [next(iter(make_loader(t.data, batch_size=16, pad_id=ws.pad_id, seed=99)))] * 3, t.lr)

    timed = alternate(["bare", "framework"], chunks, run, warmup=warmup)
    bare_s, fw_s, n = sum(timed["bare"]), sum(timed["framework"]), steps * chunks
    return {
        "framework_s_per_step": fw_s / n,
        "bare_s_per_step": bare_s / n,
        "throughput_ratio": bare_s / fw_s,
    }


def overhead(clients: int, rounds: int, steps: int) -> dict[str, float]:
    """Simulation overhead of a default-model run with one client at a time."""
    run = harness.simulate(
        [
            f"sim.num_clients={clients}",
            f"sim.rounds={rounds}",
            "sim.client_cpus=2",
            f"train.local_steps={steps}",
            "data.partitioner=iid",
            "train.precision=fp32",  # as recorded
        ]
    )
    rows = run.trained
    round_wall = sum(r["round_seconds"] for r in rows)
    compute = sum(r["client_seconds"] for r in rows)
    return {
        "round_wall_s": round_wall,
        "client_compute_s": compute,
        "simulation_overhead": (round_wall - compute) / round_wall,
        "central_eval_s": sum(r["eval_seconds"] for r in run.rows),
        "job_wall_s": run.wall_s,
        "job_overhead_incl_startup_and_eval": (run.wall_s - compute) / run.wall_s,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Both measurements; the JSON, then the two ratios against their goals."""
    ap = harness.parser(__doc__)
    harness.add_timing(ap, steps=30, chunks=4, steps_help="steps per chunk (throughput)")
    harness.add_federation(ap, rounds=2, local_steps=20, clients=4)
    args = harness.parse(ap, argv)
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
