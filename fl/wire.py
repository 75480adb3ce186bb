"""Wire format: named adapter tensors <-> Flower ArrayRecord, and what a record costs in bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, RecordDict


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord holding `state` (sorted by name, so every party sends one order)."""
    return ArrayRecord(OrderedDict((k, state[k].detach().cpu()) for k in sorted(state)))


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Named tensors from an ArrayRecord."""
    return dict(record.to_torch_state_dict())


def array_bytes(content: RecordDict) -> int:
    """Bytes of every ArrayRecord in a message's content, as Flower counts them (data + keys)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())


def num_floats(state: Mapping[str, torch.Tensor]) -> int:
    """Number of scalars in `state`."""
    return sum(int(t.numel()) for t in state.values())
