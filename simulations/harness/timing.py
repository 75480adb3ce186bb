"""Timing local training: the DP-SGD wrapper of a timed round, timed rounds of `local_train`, arms alternated in
chunks, and peak memory.

Every timed comparison here alternates its arms in one process and model: a machine's speed drifts (other jobs,
heat, caches), and reversing the order every other chunk lets the drift hit every arm alike.
"""

from __future__ import annotations

import contextlib
import resource
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from clients.train import Wrapper, local_train
from fl.app.workspace import Workspace, get_workspace
from fl.data import IndexedDataset
from privacy import ClientAccountant, make_private
from privacy.engine import PrivateRound

A = TypeVar("A", bound=Hashable)
T = TypeVar("T")

# A DP mode's (Opacus grad_sample_mode, clipping): per_layer is hooks with one bound per trainable tensor.
DP_MODES = {"hooks": ("hooks", "flat"), "ghost": ("ghost", "flat"), "per_layer": ("hooks", "per_layer")}


def dp_wrap(
    ws: Workspace,
    accountant: ClientAccountant,
    *,
    mode: str = "hooks",
    noise_seed: int | None = None,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
) -> Wrapper:
    """`local_train`'s ``wrap`` for a DP-SGD round of `ws`'s task (σ = 1, C = 1 unless given), charged to
    `accountant`; `mode` is a key of `DP_MODES`."""
    if mode not in DP_MODES:
        raise ValueError(f"DP mode {mode!r}: choose from {', '.join(DP_MODES)}")
    grad_sample_mode, clipping = DP_MODES[mode]

    def wrap(model: Any, optimizer: Any, loader: Any) -> PrivateRound:
        return make_private(
            model=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            loss_fn=ws.task_def.per_example_loss,
            noise_seed=noise_seed,
            grad_sample_mode=grad_sample_mode,
            clipping=clipping,
        )

    return wrap


@dataclass(frozen=True)
class Timing:
    """One timed round: seconds, logical steps taken, examples through the model."""

    seconds: float
    steps: int
    examples: int

    @property
    def per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


class Trainer:
    """Timed rounds of the framework's `local_train` on one workspace's model and its first `examples` training
    examples (all by default): logical batch `batch` made of physical batches of the config's
    ``train.batch_size``, AdamW at `lr` without weight decay. DP rounds share one accountant."""

    def __init__(
        self,
        overrides: Sequence[str],
        *,
        batch: int,
        examples: int | None = None,
        lr: float = 1e-3,
        noise_seed: int | None = None,
    ) -> None:
        self.ws = get_workspace(list(overrides))
        train = self.ws.task.train
        self.data = IndexedDataset(train, np.arange(len(train) if examples is None else min(examples, len(train))))
        self.batch, self.lr, self.noise_seed = batch, lr, noise_seed
        self.physical = int(self.ws.cfg.train.batch_size)
        self.accountant = ClientAccountant("rdp")

    def dp(self, mode: str = "hooks") -> Wrapper:
        """The wrap of a DP round in `mode` (see `DP_MODES`), charged to this trainer's accountant."""
        return dp_wrap(self.ws, self.accountant, mode=mode, noise_seed=self.noise_seed)

    def round(self, steps: int, seed: int, mode: str | None = None, *, wrap: Wrapper | None = None) -> Timing:
        """One local round of `steps` logical steps from the model's current state (it keeps training): without
        DP, with DP-SGD in `mode` (see `DP_MODES`), or wrapped by `wrap`."""
        res = local_train(
            self.ws.model,
            self.data,
            steps=steps,
            batch_size=self.batch,
            physical_batch_size=self.physical,
            lr=self.lr,
            weight_decay=0.0,
            pad_id=self.ws.pad_id,
            seed=seed,
            wrap=wrap or (self.dp(mode) if mode else None),
        )
        return Timing(res.seconds, res.steps, res.examples_seen)


def alternate(
    arms: Sequence[A],
    chunks: int,
    run: Callable[[A, int], T],
    *,
    warmup: Callable[[A], object] | None = None,
) -> dict[A, list[T]]:
    """``run(arm, chunk)`` for every arm in every chunk, in order on even chunks and reversed on odd ones; each
    arm's results in chunk order. `warmup(arm)` runs every arm once first, untimed."""
    order = list(arms)
    if warmup is not None:
        for arm in order:
            warmup(arm)
    out: dict[A, list[T]] = {arm: [] for arm in order}
    for chunk in range(chunks):
        for arm in order if chunk % 2 == 0 else order[::-1]:
            out[arm].append(run(arm, chunk))
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Peak summed RSS (bytes) of this process and all its descendants while running, sampled every `interval` s.

    Hand-written because `peak_rss_mib` (getrusage) sees one process, and a simulation's memory is in Ray's."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil  # only here: a bare GPU machine may lack it, and gpu_check imports this module

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process may exit between listing and reading
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
