"""One client's local training: the `train.optimizer` (AdamW by default) on the trainable adapter tensors.

A step consumes one *logical* batch (what the optimiser and, under DP, the accountant see), processed in
*physical* batches of at most `physical_batch_size` examples (what has to fit in memory): gradients are
accumulated over them, and under DP-SGD each physical step but the last is marked skipped with the DP
optimizer's ``signal_skip_step`` — the mechanism of Opacus' ``BatchMemoryManager`` — so clipping is per
example and the noise is added once per logical batch. The loss comes from one function, ``loss_fn(outputs,
batch)`` (per-example losses), so tasks other than classification plug in their own.

The batch order and dropout are seeded per (run seed, round, partition) inside a forked RNG, so a run
is reproducible no matter which Ray actor or process serves which client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler
from transformers.trainer_pt_utils import LengthGroupedSampler

from clients.drift import DriftControl
from clients.optim import load_state_tensors, make_optimizer, state_tensors
from fl.accel import autocast
from fl.checks import derive_seed
from fl.data import IndexedDataset
from fl.tasks import get_task
from privacy import release
from privacy.engine import ExampleLoss, PrivateRound

# (model, optimizer, loader) -> PrivateRound: e.g. privacy.make_private with the run's DP settings.
Wrapper = Callable[[torch.nn.Module, torch.optim.Optimizer, DataLoader], PrivateRound]


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training did."""

    loss: float  # mean training loss over the steps
    steps: int  # optimiser steps taken
    seconds: float  # wall seconds of the training loop
    num_examples: int  # examples in the client's partition (the aggregation weight)
    examples_seen: int = 0  # examples that went through the model (Poisson batches vary around the logical one)
    # the optimiser's state after the round (clients.optim.state_tensors), for train.keep_optimizer_state
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A per-(run, round, client) seed."""
    return derive_seed(seed, server_round=server_round, index=partition_id)


def make_loader(
    dataset: IndexedDataset, *, batch_size: int, pad_id: int, seed: int, group_by_length: bool = False
) -> DataLoader:
    """Shuffled mini-batches with dynamic padding, in an order fixed by `seed`.

    `group_by_length` draws them with transformers' `LengthGroupedSampler` (as `Trainer(group_by_length=True)`):
    a shuffled order cut into mega-batches of 50 batches, each sorted by length, so a batch holds examples of
    similar length and pads little (a MiniLM step on the tweets ~0.6x; BENCHMARKS.md, overheads).
    """
    gen = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(dataset))
    sampler: Sampler[int] = RandomSampler(dataset, generator=gen)
    if group_by_length:
        lengths = [len(dataset.split.input_ids[int(i)]) for i in dataset.indices]
        sampler = LengthGroupedSampler(size, lengths=lengths, generator=gen)
    return DataLoader(
        dataset,
        batch_size=size,
        sampler=sampler,
        collate_fn=partial(get_task(dataset.split.task).collate, pad_id=pad_id),
    )


def _cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def _batch_len(batch: Mapping[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


def in_order_split(batch: Mapping[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive slices of at most `size` examples, each keeping the logical batch's padding."""
    return [{k: v[s : s + size] for k, v in batch.items()} for s in range(0, _batch_len(batch), size)]


def split_batch(batch: Mapping[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """A logical batch as physical batches of at most `size` examples (all of it when `size` ≥ its length).

    A logical batch comes padded to its longest sequence. When it is split, the examples go into physical
    batches by length (shortest first) and each physical batch is cut to its own longest sequence, so passes
    are not spent on padding. The order of examples does not change the logical batch's gradient (a mean,
    or under DP-SGD a sum of per-example clipped gradients). Cutting needs right padding (this framework's
    collates); a batch whose ``attention_mask`` is not right-padded is split in order, uncut.
    """
    if size < 1:
        raise ValueError(f"The physical batch must be at least 1 example, got {size}; set train.batch_size >= 1.")
    n = _batch_len(batch)
    if size >= n:
        return [dict(batch)]
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return in_order_split(batch, size)
    lengths = mask.sum(1)
    width = mask.shape[1]
    right_padded = bool((mask == (torch.arange(width, device=mask.device) < lengths[:, None])).all())
    if not right_padded:
        return in_order_split(batch, size)
    order = torch.argsort(lengths, stable=True)
    chunks = []
    for s in range(0, n, size):
        idx = order[s : s + size]
        longest = max(1, int(lengths[idx].max()))
        chunks.append(
            {k: v[idx][:, :longest] if v.dim() >= 2 and v.shape[1] == width else v[idx] for k, v in batch.items()}
        )
    return chunks


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
    physical_batch_size: int | None = None,
    loss_fn: ExampleLoss | None = None,
    optimizer_name: str = "adamw",
    momentum: float = 0.0,
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
    group_by_length: bool = False,
    drift: DriftControl | None = None,
) -> TrainResult:
    """Train the model's trainable parameters in place for `steps` optimiser steps.

    Parameters
    ----------
    model : torch.nn.Module
        A PEFT model whose `requires_grad` parameters are the ones this method trains.
    dataset : IndexedDataset
        The client's partition.
    steps : int
        Optimiser steps (logical batches) to take.
    batch_size : int
        The logical batch (examples per optimiser step; under DP the expected Poisson batch).
    lr, weight_decay : float
        The optimiser's settings.
    pad_id : int
        Token id used for padding.
    seed : int
        Fixes batch order and dropout (see `round_seed`).
    wrap : callable, optional
        Turns (model, optimizer, loader) into private ones (DP-SGD); called once per round.
    precision : str
        `train.precision` (auto, fp32, bf16, fp16): the autocast dtype where it applies (`fl.accel.autocast`);
        fp16 on CUDA adds a loss scaler (not under DP).
    physical_batch_size : int, optional
        Examples per forward/backward pass; default: the whole logical batch at once.
    loss_fn : callable, optional
        ``(outputs, batch) -> per-example losses``; default: the dataset's task's
        (`fl.tasks.Task.per_example_loss`). Batches go to the model's device.
    optimizer_name, momentum : str, float
        `train.optimizer` (`clients.optim.OPTIMIZERS`: adamw, sgd) and SGD's momentum.
    optimizer_state : mapping, optional
        The optimiser state this client kept from its last round (`clients.optim.state_tensors`); the
        result's `optimizer_state` is the state after this round's steps.
    group_by_length : bool
        `train.group_by_length`: batches of similar-length examples (`make_loader`); a DP `wrap` replaces the
        loader with Opacus' Poisson sampler, so it has no effect there.
    drift : DriftControl, optional
        `drift=` (FedProx, SCAFFOLD; `clients.drift`): hooked on the inner optimiser for this round, so under DP
        it acts on the released gradient (no ε); its round state (SCAFFOLD's Δc_i) is read after the call.
    """
    task = get_task(dataset.split.task)
    device = next(model.parameters()).device
    if len(dataset) == 0:
        raise ValueError("This client's partition is empty; it cannot train.")
    physical = int(physical_batch_size or batch_size)
    example_loss = loss_fn or task.per_example_loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optimizer_name, params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if optimizer_state:
        load_state_tensors(optimizer, optimizer_state)
    raw_optimizer = optimizer  # Opacus' DPOptimizer wraps it; its state is this one's
    if drift is not None:  # on the inner optimiser: under DP its hooks see the clipped, noised gradient
        drift.attach(raw_optimizer, {n: p for n, p in model.named_parameters() if p.requires_grad})
    loader = make_loader(dataset, batch_size=batch_size, pad_id=pad_id, seed=seed, group_by_length=group_by_length)
    net = model
    model.train()  # before wrapping: Opacus validates a module in training mode
    private: PrivateRound | None = None
    if wrap is not None:
        private = wrap(model, optimizer, loader)
        net, optimizer, loader = private.module, private.optimizer, private.data_loader
    # fp16 on CUDA needs loss scaling (config validation keeps it away from DP); a no-op otherwise.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    t0 = time.perf_counter()
    total, seen, taken = 0.0, 0, 0
    net.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batches = _cycle(loader)
        for _ in range(steps):
            batch = next(batches)
            n = _batch_len(batch) if isinstance(batch, dict) else 0
            if n == 0:
                # Poisson sampling drew an empty batch (probability ~e^-batch_size): no step is taken or charged.
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            chunks = split_batch(batch, physical)
            for i, chunk in enumerate(chunks):
                with autocast(device, precision):
                    outputs = net(**task.model_inputs(chunk))
                    if private is not None:
                        private.optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
                        loss = private.objective(outputs, chunk)  # batch mean; Opacus clips per example
                    else:
                        losses = example_loss(outputs, chunk)
                if private is not None:
                    loss.backward()
                    optimizer.step()  # clips and accumulates; noise and the update only on the last chunk
                    optimizer.zero_grad(set_to_none=True)
                    value = float(loss.detach()) * _batch_len(chunk)
                else:
                    scaler.scale(losses.sum() / n).backward()  # the logical batch's mean, accumulated over chunks
                    value = float(losses.detach().sum())
                total += value
                seen += _batch_len(chunk)
            if private is None:
                scaler.step(optimizer)
                scaler.update()
            taken += 1
    net.eval()
    seconds = time.perf_counter() - t0
    if drift is not None:
        drift.detach()
    if net is not model:
        release(net)
    return TrainResult(
        loss=total / max(seen, 1),
        steps=taken,
        seconds=seconds,
        num_examples=len(dataset),
        examples_seen=seen,
        optimizer_state=state_tensors(raw_optimizer),
    )
