"""Evaluate a model on a tokenised split with the split's task (`fl.tasks`): mean loss and accuracy."""

from __future__ import annotations

import torch

from fl.accel import autocast
from fl.data import TokenizedSplit
from fl.tasks import get_task


def evaluate_metrics(
    model: torch.nn.Module, split: TokenizedSplit, *, batch_size: int, pad_id: int, precision: str = "fp32"
) -> dict[str, float]:
    """Every metric the task reports (always ``loss`` and ``accuracy``; a causal LM adds ``perplexity``).

    `precision` is `train.precision`: forward passes run under the same autocast as training (`fl.accel`).
    """
    device = next(model.parameters()).device
    with autocast(device, precision):
        return get_task(split.task).evaluate(model, split, batch_size=batch_size, pad_id=pad_id)


def evaluate(
    model: torch.nn.Module, split: TokenizedSplit, *, batch_size: int, pad_id: int, precision: str = "fp32"
) -> tuple[float, float]:
    """Return (mean per-example loss, accuracy) of `model` on `split`."""
    m = evaluate_metrics(model, split, batch_size=batch_size, pad_id=pad_id, precision=precision)
    return m["loss"], m["accuracy"]
