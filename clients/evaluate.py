"""Evaluate a classifier on a tokenised split: mean loss and accuracy."""

from __future__ import annotations

import torch

from fl.data import IndexedDataset, TokenizedSplit, collate


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: TokenizedSplit, *, batch_size: int, pad_id: int) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of `model` on `split`.

    Batches are formed from length-sorted examples so dynamic padding wastes little compute.
    """
    if len(split) == 0:
        raise ValueError("Cannot evaluate on an empty split.")
    was_training = model.training
    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
    ds = IndexedDataset(split)
    total_loss, correct = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([ds[i] for i in order[start : start + batch_size]], pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return total_loss / len(split), correct / len(split)
