"""The task protocol: everything in a run that depends on what the model predicts.

A task builds the base model and its data, collates batches, gives each example's loss (the training loop,
Fed-SB's init gradient and DP-SGD's per-example clipping all use it), evaluates, and says which modules
train besides the adapter. Apps, strategies, privacy and the sweep call these hooks and never branch on
the task; adding one is a module in `fl/tasks/` registered by its `model.task` name, plus a model YAML.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fl.data import TaskData, TokenizedSplit
from fl.models import public_id

Batch = dict[str, torch.Tensor]


class Task(ABC):
    """One kind of model output (`model.task`): its model, data, batches, loss and metrics."""

    name: ClassVar[str]
    class_labels: ClassVar[bool] = False  # examples carry one class label each (a label-flip attack needs them)
    logit_calibration: ClassVar[bool] = False  # `calibrated_loss` exists (FedLC, `train.fedlc_tau`)

    @abstractmethod
    def build_model(
        self, model_cfg: DictConfig, *, num_labels: int, seed: int, cache_dir: str | None = None
    ) -> PreTrainedModel:
        """The frozen base model in eval mode, on CPU, built deterministically from `seed`."""

    @abstractmethod
    def build_data(
        self, data_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int, cache_dir: str | None = None
    ) -> TaskData:
        """Load, check, format and tokenise the pool; hold out the server's test split (cached on disk)."""

    @abstractmethod
    def collate(self, batch: Sequence[tuple[Any, ...]], pad_id: int) -> Batch:
        """Pad a list of dataset items (`fl.data.IndexedDataset`) into a batch dict with ``labels``."""

    @abstractmethod
    def per_example_loss(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each example's mean loss, shape (batch,), from the model's `outputs` on `model_inputs(batch)`.

        Its mean is the training loss; per-example clipping (DP-SGD, ghost clipping) needs it per example.
        """

    @abstractmethod
    def evaluate(
        self, model: torch.nn.Module, split: TokenizedSplit, *, batch_size: int, pad_id: int
    ) -> dict[str, float]:
        """Metrics of `model` on `split`; always ``loss`` (mean per example) and ``accuracy``."""

    @abstractmethod
    def trained_modules(self, model: PreTrainedModel) -> list[str]:
        """Modules trained and averaged in full besides the adapter (PEFT ``modules_to_save``)."""

    def calibrated_loss(self, shift: torch.Tensor) -> Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]:
        """Each example's cross-entropy on the class logits minus `shift` (one value per class): FedLC's
        calibrated loss (`clients.calibration`); only tasks with ``logit_calibration`` have one."""
        raise NotImplementedError(f"model.task={self.name} has no class logits to calibrate (train.fedlc_tau)")

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> Batch:
        """The model's keyword inputs (the batch without ``labels``, so the model does not compute a loss)."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def loss_of(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example losses of `model` on `batch` (``(model, batch) -> losses``, privacy's `LossFn`)."""
        return self.per_example_loss(model(**self.model_inputs(batch)), batch)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Register a task under its `name` (the `model.task` value); a name is registered once."""
    if task.name in _TASKS:
        raise ValueError(f"A task named {task.name!r} is already registered.")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task for `model.task`; the error lists the valid names."""
    if name not in _TASKS:
        raise ValueError(f"model.task={name!r} is unknown; valid tasks: {sorted(_TASKS)}.")
    return _TASKS[name]


def task_names() -> list[str]:
    """Registered `model.task` names."""
    return sorted(_TASKS)


def load_base_model(
    model_cfg: DictConfig, *, num_labels: int, seed: int, cache_dir: str | None = None
) -> PreTrainedModel:
    """Build the frozen base model of `model.task`, seeded (a classifier gets a `num_labels` head).

    The model is named by its public id (`fl.models.public_id`), which an exported adapter_config.json records
    as ``base_model_name_or_path`` instead of this machine's package path.
    """
    model = get_task(str(model_cfg.task)).build_model(model_cfg, num_labels=num_labels, seed=seed, cache_dir=cache_dir)
    name = public_id(str(model_cfg.name))
    model.name_or_path = name
    model.config._name_or_path = name
    return model
