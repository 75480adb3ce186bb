"""`train.group_by_length`: batches of similar length from transformers' LengthGroupedSampler, seeded."""

from __future__ import annotations

import numpy as np
import torch

from clients.train import make_loader
from fl.data import IndexedDataset, TokenizedSplit


def _split(n: int = 800, seed: int = 0) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    ids = [torch.arange(1, int(k) + 1) for k in rng.integers(3, 64, size=n)]
    return TokenizedSplit(input_ids=ids, labels=torch.zeros(n, dtype=torch.long))


def _padding(loader: torch.utils.data.DataLoader) -> float:
    mask = [b["attention_mask"] for b in loader]
    return float(sum((1 - m).sum() for m in mask) / sum(m.numel() for m in mask))


def test_grouped_batches_pad_less_and_cover_every_example_once() -> None:
    data = IndexedDataset(_split(), np.arange(100, 800))
    plain = make_loader(data, batch_size=16, pad_id=0, seed=3)
    grouped = make_loader(data, batch_size=16, pad_id=0, seed=3, group_by_length=True)
    assert _padding(grouped) < 0.5 * _padding(plain)
    seen = sorted(int(i) for i in grouped.sampler)  # indices into the view: each example exactly once per epoch
    assert seen == list(range(len(data)))


def test_grouped_order_is_fixed_by_the_seed() -> None:
    data = IndexedDataset(_split(), None)
    first = [list(make_loader(data, batch_size=16, pad_id=0, seed=s, group_by_length=True).sampler) for s in (1, 1, 2)]
    assert first[0] == first[1] and first[0] != first[2]
