"""Fed-SB's federated initialisation on a client: the gradient sum w.r.t. every adapted W0.

The client sums ∇_{W0} loss over its first `strategy.init_examples` examples (a seeded choice) with the
adapter switched off, so the gradient is taken at the pretrained weights, and sends the dense sums once.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from clients.dp import client_plan, load_accountant, save_accountant
from fl import constants as K
from fl.data import IndexedDataset, collate
from fl.wire import to_record
from fl.workspace import Workspace
from privacy import noisy_gradient_sum

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
    """Reply to the server's init-grad message with this client's gradient sums.

    Under DP the sum is privatised — each example's gradient clipped to `privacy.max_grad_norm`, Gaussian
    noise of std σ_init·C added once (σ_init from `privacy.init_share`) — and charged to the client's
    accountant as one full-batch step (sample rate 1); the client's DP plan reserves budget for it.
    """
    cfg = ws.cfg
    subset = init_examples(data, count=int(cfg.strategy.init_examples), seed=int(cfg.seed) + pid)
    content = RecordDict()
    metrics: dict[str, int | float | list[int] | list[float]] = {K.NUM_EXAMPLES: len(subset), K.PARTITION_ID: pid}
    if cfg.privacy.enabled:
        plan = client_plan(cfg, len(data))
        accountant = load_accountant(context, msg, plan.accountant)
        bases = {n: p for n, p in ws.model.named_parameters() if n.endswith(BASE_SUFFIX)}
        batches = [
            collate([subset[i] for i in range(s, min(s + 16, len(subset)))], ws.pad_id)
            for s in range(0, len(subset), 16)
        ]
        ws.model.eval()
        flags = {n: p.requires_grad for n, p in ws.model.named_parameters()}
        # PEFT's disable_adapter() re-enables requires_grad on every adapter tensor when it exits
        # (set_adapter), which would unfreeze Fed-SB's A and B: restore the flags after the context.
        with ws.model.disable_adapter():
            grads = noisy_gradient_sum(
                model=ws.model,
                params=bases,
                batches=batches,
                max_grad_norm=plan.max_grad_norm,
                noise_multiplier=float(plan.init_noise_multiplier or plan.noise_multiplier),
                generator=torch.Generator().manual_seed(int(cfg.seed) * 7919 + pid),
                accountant=accountant,
            )
        for n, p in ws.model.named_parameters():
            p.requires_grad_(flags[n])
        metrics[K.EPSILON] = accountant.epsilon(plan.delta)
        content[K.STATE_PRIVACY] = save_accountant(context, accountant)
    else:
        grads = gradient_sum(ws.model, subset, batch_size=int(cfg.train.batch_size), pad_id=ws.pad_id)
    content[K.ARRAYS] = to_record(grads)
    content[K.METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)
