"""Centralised LoRA on the federation's data: the reference a federated method is measured against.

Same model, adapter (the strategy's kind, rank, alpha), optimiser (AdamW, `strategy.lr`, weight decay,
batch size), precision (`train.precision`), learning-rate schedule, tokenised pool and held-out test split
as the federated run the overrides describe; the training set is the union of every client's partition,
and one model trains on it for `--steps` optimiser steps. Compare at the same total number of client
steps: rounds × local steps × clients per round (e.g. 10 × 10 × 10 = 1,000 for `sweep=methods_seeds`).
The schedule follows the federation's rounds: step s of N trains at the rate of round 1 + ⌊s·R/N⌋ of R
(`fl.schedule.round_lr`), so a cosine across rounds is the same staircase centrally.

Usage::

    python -m simulations.centralised --steps 1000 --eval-every 100
    python -m simulations.centralised --steps 500 strategy=ffa_lora strategy.lr=1e-2
    python -m simulations.centralised --steps 250 --out runs/anchor +experiment=smollm2   # then: fl-eval runs/anchor

With ``--out DIR`` the folder is a run folder `fl-eval` scores like a federated one: ``config.yaml`` (the composed
config), ``adapter/`` (a standard PEFT adapter of the trained model), ``summary.json`` (``final_accuracy``,
``best_val_step``) and ``centralised.jsonl`` (the history; not ``metrics.jsonl``, whose rows are rounds).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from clients.evaluate import evaluate
from clients.train import make_loader, round_seed
from fl.accel import autocast
from fl.adapters import export_peft
from fl.app.config import compose
from fl.app.server_app import export_base
from fl.app.workspace import get_workspace
from fl.data import IndexedDataset, client_partition
from fl.outputs import RunOutputs, best_round, write_atomic
from fl.schedule import round_lr
from simulations import harness


def pooled_indices(overrides: list[str]) -> np.ndarray:
    """The union of every client's partition (the data the federation trains on, pooled)."""
    ws = get_workspace(overrides)
    cfg = ws.cfg
    n = int(cfg.sim.num_clients)
    parts = [client_partition(ws.task, cfg.data, pid=p, num_partitions=n, seed=int(cfg.seed)) for p in range(n)]
    return np.sort(np.concatenate(parts))


def run(
    overrides: list[str], *, steps: int, eval_every: int, out_dir: str | Path | None = None
) -> list[dict[str, float]]:
    """Train centrally for `steps` AdamW steps; evaluate on the held-out split every `eval_every` steps.

    With `out_dir`, also write a run folder `fl-eval` scores (see the module docstring).
    """
    ws = get_workspace(overrides)
    cfg = ws.cfg
    out = RunOutputs(out_dir) if out_dir is not None else None
    if out is not None:
        out.write_config(cfg)
    data = IndexedDataset(ws.task.train, pooled_indices(overrides))
    model = ws.model
    task = ws.task_def  # kept logits and per-example means for a causal LM, as the clients train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.strategy.lr), weight_decay=float(cfg.train.weight_decay))
    seed = round_seed(int(cfg.seed), 0, 0)
    loader = make_loader(data, batch_size=int(cfg.train.batch_size), pad_id=ws.pad_id, seed=seed)
    bs = int(cfg.train.eval_batch_size)
    precision, cpu = str(cfg.train.precision), torch.device("cpu")
    rounds = int(cfg.sim.rounds)

    def lr_at(step: int) -> float:  # the federation's per-round rate, round 1 + floor(step * R / N)
        return round_lr(
            1 + step * rounds // steps,
            peak=float(cfg.strategy.lr),
            total_rounds=rounds,
            schedule=str(cfg.train.lr_schedule),
            warmup_rounds=int(cfg.train.warmup_rounds),
            lr_min=float(cfg.train.lr_min),
        )

    def scores() -> dict[str, float]:  # test, and the validation split (data.val_size) every choice reads
        row: dict[str, float] = {}
        row["loss"], row["accuracy"] = evaluate(
            model, ws.task.test, batch_size=bs, pad_id=ws.pad_id, precision=precision
        )
        if ws.task.val is not None:
            row["val_loss"], row["val_accuracy"] = evaluate(
                model, ws.task.val, batch_size=bs, pad_id=ws.pad_id, precision=precision
            )
        return row

    def record(row: dict[str, float]) -> None:
        history.append(row)
        print(json.dumps(row), flush=True)
        if out is not None:
            with (out.dir / HISTORY_FILE).open("a") as f:
                f.write(json.dumps(row) + "\n")

    history: list[dict[str, float]] = []
    if out is not None:
        write_atomic(out.dir / HISTORY_FILE, "")
    record({"step": 0, **scores(), "seconds": 0.0})
    t0, step = time.perf_counter(), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while step < steps:
            for batch in loader:
                model.train()
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                opt.zero_grad(set_to_none=True)
                with autocast(cpu, precision):  # the clients' objective: the mean of the task's per-example losses
                    loss = task.loss_of(model, batch).mean()
                loss.backward()
                opt.step()
                step += 1
                if step % eval_every == 0 or step == steps:
                    seconds = time.perf_counter() - t0
                    record({"step": step, **scores(), "lr": lr_at(step - 1), "seconds": seconds})
                if step >= steps:
                    break
    print(
        f"centralised {cfg.strategy.name} (adapter of that method, trained on one machine): "
        f"{len(data)} pooled examples, {steps} steps of batch {cfg.train.batch_size}, lr {cfg.strategy.lr:g} "
        f"({cfg.train.lr_schedule} over {rounds} rounds' worth), {precision} "
        f"-> accuracy {history[-1]['accuracy']:.4f} on {len(ws.task.test)} held-out examples"
    )
    if out is not None:
        export_peft(ws.model, kind=ws.kind, base=export_base(ws), out_dir=out.adapter_dir)  # type: ignore[arg-type]
        out.write_summary(summary(cfg, history, pooled=len(data), adapter_dir=out.adapter_dir))
    return history


HISTORY_FILE = "centralised.jsonl"


def summary(cfg: DictConfig, history: list[dict[str, float]], *, pooled: int, adapter_dir: Path) -> dict[str, object]:
    """The run folder's ``summary.json``: the final scores, and the step the validation split would choose."""
    last = history[-1]
    best = best_round([{**h, "round": h["step"]} for h in history])  # the shared rule: val only, latest on a tie
    return {
        "strategy": "centralised",
        "adapter_kind": str(cfg.strategy.name),
        "steps": int(last["step"]),
        "pooled_examples": pooled,
        "final_accuracy": last["accuracy"],
        "final_loss": last["loss"],
        "final_val_accuracy": last.get("val_accuracy"),
        "best_val_step": best["best_round"],
        "best_val_step_accuracy": best["best_round_accuracy"],
        "wall_seconds": last["seconds"],
        "adapter_dir": str(adapter_dir),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m simulations.centralised [--steps N] [--eval-every K] [overrides...]`."""
    ap = harness.parser(__doc__)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for fl-sim")
    ap.add_argument("--steps", type=int, default=1000, help="optimiser steps (compare at equal client steps)")
    ap.add_argument("--eval-every", type=int, default=100, help="evaluate every this many steps")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", type=Path, help="write a run folder fl-eval scores (config, adapter, summary, history)")
    args = harness.parse(ap, argv)
    if args.steps < 1 or args.eval_every < 1:
        ap.error(f"--steps ({args.steps}) and --eval-every ({args.eval_every}) must be at least 1")
    torch.set_num_threads(args.threads)
    compose(args.overrides)  # a bad value fails here with the field's name
    run(list(args.overrides), steps=args.steps, eval_every=args.eval_every, out_dir=args.out)


if __name__ == "__main__":
    main()
