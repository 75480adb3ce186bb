"""What a client keeps in its node's `Context.state` between the rounds it joins, and the model it trains from.

Tensors a method keeps frozen and sends only once (Fed-SB's A and B) are kept, and so are tensors a method makes
personal (the ConfigRecord's `personal-suffixes`, FedSA-LoRA's B): a client starts them from PEFT's initialisation,
keeps them as it trained them, and never takes them from the server. With `train.keep_optimizer_state` the
optimiser's state stays too (under DP a function of the client's noised updates only).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from omegaconf import DictConfig

from fl import constants as K
from fl.adapters import load_tensors
from fl.app.workspace import Workspace
from fl.base_delta import apply_base_delta, fold_factors
from fl.wire import from_record, to_record


def personal_suffixes(conf: ConfigRecord) -> tuple[str, ...]:
    """Name suffixes of the tensors this client keeps as its own (`K.PERSONAL`, e.g. FedSA-LoRA's B); () if none."""
    raw = conf.get(K.PERSONAL)
    return tuple(str(x) for x in raw) if isinstance(raw, list) else ()


def _own_tensors(context: Context, ws: Workspace, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """This client's personal tensors: as it last trained them (`Context.state`), else PEFT's initialisation."""
    if K.STATE_PERSONAL in context.state.array_records:
        return from_record(context.state.array_records[K.STATE_PERSONAL])
    return {n: t.clone() for n, t in ws.initial.items() if n.endswith(suffixes)}


def load_global(msg: Message, context: Context, ws: Workspace) -> dict[str, torch.Tensor]:
    """Put the server's tensors (and any frozen ones, sent now or kept from before) into the model, with this
    client's own personal tensors in place of any the message names; returns the trainable tensors loaded."""
    content = msg.content
    if K.FROZEN in content.array_records:  # sent once: keep for the rounds after
        context.state[K.STATE_FROZEN] = content.array_records[K.FROZEN]
    if K.STATE_FROZEN in context.state.array_records:
        load_tensors(ws.model, from_record(context.state.array_records[K.STATE_FROZEN]))
    delta = content.array_records.get(K.BASE_DELTA)
    fold = from_record(delta) if delta is not None else {}  # FedEx-LoRA's fold (absolute)
    if K.BASE_DELTA_FACTORS in content.array_records:  # the same as factor pairs (FLoRA's stacks)
        for name, d in fold_factors(ws.model, from_record(content.array_records[K.BASE_DELTA_FACTORS])).items():
            fold[name] = fold[name] + d if name in fold else d
    apply_base_delta(ws.model, fold)
    expected = {n for n, p in ws.model.named_parameters() if p.requires_grad}
    state = from_record(content.array_records[K.ARRAYS])
    suffixes = personal_suffixes(content.config_records[K.CONFIG])
    if suffixes:  # never the server's: the client's own copy replaces anything the message holds under these names
        state = {n: t for n, t in state.items() if not n.endswith(suffixes)} | _own_tensors(context, ws, suffixes)
    load_tensors(ws.model, state, expect=expected)
    return state


def kept_optimizer_state(cfg: DictConfig, context: Context) -> dict[str, torch.Tensor] | None:
    """The optimiser state this client kept from the last round it joined (`train.keep_optimizer_state`)."""
    if not cfg.train.keep_optimizer_state or K.STATE_OPTIMIZER not in context.state.array_records:
        return None
    return dict(context.state.array_records[K.STATE_OPTIMIZER].to_torch_state_dict())


def keep_after_round(
    context: Context,
    cfg: DictConfig,
    *,
    trained: Mapping[str, torch.Tensor],
    suffixes: tuple[str, ...],
    optimizer_state: dict[str, torch.Tensor],
) -> None:
    """Keep what the next round this client joins starts from: its personal tensors as it trained them (its reply
    still carries them, for the server's mean) and, with `train.keep_optimizer_state`, the optimiser's state."""
    if cfg.train.keep_optimizer_state:
        context.state[K.STATE_OPTIMIZER] = ArrayRecord(torch_state_dict=optimizer_state)
    if suffixes:
        context.state[K.STATE_PERSONAL] = to_record({n: t for n, t in trained.items() if n.endswith(suffixes)})
