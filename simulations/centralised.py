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
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import numpy as np
import torch

from clients.evaluate import evaluate
from clients.train import make_loader, round_seed
from fl.accel import autocast
from fl.app.config import compose
from fl.app.workspace import get_workspace
from fl.data import IndexedDataset, client_partition
from fl.schedule import round_lr
from simulations import harness


def pooled_indices(overrides: list[str]) -> np.ndarray:
    """The union of every client's partition (the data the federation trains on, pooled)."""
    ws = get_workspace(overrides)
    cfg = ws.cfg
    n = int(cfg.sim.num_clients)
    parts = [client_partition(ws.task, cfg.data, pid=p, num_partitions=n, seed=int(cfg.seed)) for p in range(n)]
    return np.sort(np.concatenate(parts))


def run(overrides: list[str], *, steps: int, eval_every: int) -> list[dict[str, float]]:
    """Train centrally for `steps` AdamW steps; evaluate on the held-out split every `eval_every` steps."""
    ws = get_workspace(overrides)
    cfg = ws.cfg
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

    history = [{"step": 0, **scores(), "seconds": 0.0}]
    print(json.dumps(history[-1]), flush=True)
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
                    history.append({"step": step, **scores(), "lr": lr_at(step - 1), "seconds": seconds})
                    print(json.dumps(history[-1]), flush=True)
                if step >= steps:
                    break
    print(
        f"centralised {cfg.strategy.name} (adapter of that method, trained on one machine): "
        f"{len(data)} pooled examples, {steps} steps of batch {cfg.train.batch_size}, lr {cfg.strategy.lr:g} "
        f"({cfg.train.lr_schedule} over {rounds} rounds' worth), {precision} "
        f"-> accuracy {history[-1]['accuracy']:.4f} on {len(ws.task.test)} held-out examples"
    )
    return history


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m simulations.centralised [--steps N] [--eval-every K] [overrides...]`."""
    ap = harness.parser(__doc__)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for fl-sim")
    ap.add_argument("--steps", type=int, default=1000, help="optimiser steps (compare at equal client steps)")
    ap.add_argument("--eval-every", type=int, default=100, help="evaluate every this many steps")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = harness.parse(ap, argv)
    if args.steps < 1 or args.eval_every < 1:
        ap.error(f"--steps ({args.steps}) and --eval-every ({args.eval_every}) must be at least 1")
    torch.set_num_threads(args.threads)
    compose(args.overrides)  # a bad value fails here with the field's name
    run(list(args.overrides), steps=args.steps, eval_every=args.eval_every)


if __name__ == "__main__":
    main()
