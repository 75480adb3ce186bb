"""Fed-SB's federated initialisation on a client: the gradient sum w.r.t. every adapted W0.

The client sums ∇_{W0} loss over its first `strategy.init_examples` examples (a seeded choice) with the
adapter switched off, so the gradient is taken at the pretrained weights, and sends the dense sums once.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fl import constants as K
from fl.data import IndexedDataset, collate
from fl.wire import to_record
from fl.workspace import Workspace

BASE_SUFFIX = ".base_layer.weight"


def init_examples(data: IndexedDataset, *, count: int, seed: int) -> IndexedDataset:
    """A seeded subset of at most `count` of the client's examples."""
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(data))[: min(count, len(data))]
    return IndexedDataset(data.split, data.indices[np.sort(pick)])


def gradient_sum(
    model: torch.nn.Module, data: IndexedDataset, *, batch_size: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Σ over `data` of ∇ loss w.r.t. each adapted layer's frozen base weight, adapter disabled."""
    bases = {n: p for n, p in model.named_parameters() if n.endswith(BASE_SUFFIX)}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in bases.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        model.eval()  # no dropout: the gradient of the pretrained model itself
        with model.disable_adapter():  # type: ignore[operator]
            for start in range(0, len(data), batch_size):
                batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))], pad_id)
                labels = batch.pop("labels")
                logits = model(**batch).logits
                torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        return {n: p.grad.detach().clone() for n, p in bases.items() if p.grad is not None}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])


def init_gradient_reply(msg: Message, context: Context, ws: Workspace, data: IndexedDataset, *, pid: int) -> Message:
    """Reply to the server's init-grad message with this client's gradient sums."""
    cfg = ws.cfg
    subset = init_examples(data, count=int(cfg.strategy.init_examples), seed=int(cfg.seed) + pid)
    grads = gradient_sum(ws.model, subset, batch_size=int(cfg.train.batch_size), pad_id=ws.pad_id)
    metrics = MetricRecord({K.NUM_EXAMPLES: len(subset), K.PARTITION_ID: pid})
    return Message(RecordDict({K.ARRAYS: to_record(grads), K.METRICS: metrics}), reply_to=msg)
