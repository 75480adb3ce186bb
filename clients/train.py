"""One client's local training: AdamW on the trainable adapter tensors for a number of steps.

The batch order and dropout are seeded per (run seed, round, partition) inside a forked RNG, so a run
is reproducible no matter which Ray actor or process serves which client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader, RandomSampler

from fl.accel import autocast
from fl.data import IndexedDataset
from fl.tasks import get_task
from privacy import release

# (model, optimizer, loader) -> (model, optimizer, loader): e.g. Opacus' make_private.
Wrapper = Callable[
    [torch.nn.Module, torch.optim.Optimizer, DataLoader],
    tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader],
]


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training did."""

    loss: float  # mean training loss over the steps
    steps: int  # optimiser steps taken
    seconds: float  # wall seconds of the training loop
    num_examples: int  # examples in the client's partition (the aggregation weight)


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A per-(run, round, client) seed."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31 - 1)


def make_loader(dataset: IndexedDataset, *, batch_size: int, pad_id: int, seed: int) -> DataLoader:
    """Shuffled mini-batches with dynamic padding, in an order fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        sampler=RandomSampler(dataset, generator=gen),
        collate_fn=partial(get_task(dataset.split.task).collate, pad_id=pad_id),
    )


def _cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def local_train(
    model: torch.nn.Module,
    dataset: IndexedDataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    pad_id: int,
    seed: int,
    wrap: Wrapper | None = None,
    precision: str = "fp32",
) -> TrainResult:
    """Train the model's trainable parameters in place for `steps` optimiser steps.

    Parameters
    ----------
    model : torch.nn.Module
        A PEFT model whose `requires_grad` parameters are the ones this method trains.
    dataset : IndexedDataset
        The client's partition.
    steps : int
        Optimiser steps (batches) to take.
    lr, weight_decay : float
        AdamW settings.
    pad_id : int
        Token id used for padding.
    seed : int
        Fixes batch order and dropout (see `round_seed`).
    wrap : callable, optional
        Turns (model, optimizer, loader) into private ones (DP-SGD); called once per round.
    precision : str
        `train.precision`: autocast dtype on CUDA (`fl.accel.autocast`); fp16 adds a loss scaler.

    The loss is the mean of the dataset's task's per-example loss (`fl.tasks.Task.per_example_loss`);
    batches go to the model's device.
    """
    task = get_task(dataset.split.task)
    device = next(model.parameters()).device
    if len(dataset) == 0:
        raise ValueError("This client's partition is empty; it cannot train.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loader = make_loader(dataset, batch_size=batch_size, pad_id=pad_id, seed=seed)
    net = model
    model.train()  # before wrapping: Opacus validates a module in training mode
    if wrap is not None:
        net, optimizer, loader = wrap(model, optimizer, loader)
    # fp16 on CUDA needs loss scaling (config validation keeps it away from DP); a no-op otherwise.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    t0 = time.perf_counter()
    total, taken = 0.0, 0
    net.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batches = _cycle(loader)
        for _ in range(steps):
            batch = next(batches)
            if not isinstance(batch, dict) or batch["labels"].numel() == 0:
                # Poisson sampling drew an empty batch (probability ~e^-batch_size): no step is taken or charged.
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = task.loss_of(net, batch).mean()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach())
            taken += 1
    net.eval()
    seconds = time.perf_counter() - t0
    if net is not model:
        release(net)
    return TrainResult(loss=total / max(taken, 1), steps=taken, seconds=seconds, num_examples=len(dataset))
