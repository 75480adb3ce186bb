"""Sequence classification (`model.task=seq_cls`): an encoder with a classification head over text labels.

The head is new (seeded) and trained and averaged in full by every method (PEFT ``modules_to_save``);
the loss is the cross-entropy of the head's logits; evaluation gives mean loss and accuracy. The data is a
pool of (text, label) rows (`fl.data.load_pool`), split and tokenised once (`build_task_data`, cached on disk)
and padded per batch (`collate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from omegaconf import DictConfig
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fl.data import (
    IndexedDataset,
    TaskData,
    TokenizedSplit,
    cached_task_data,
    label_ids,
    load_pool,
    public_order,
    split_order,
    val_order,
)
from fl.models import HEAD_NAMES, TINY_MODEL, load_tokenizer, quiet_load, resolve_name
from fl.tasks.base import Batch, Task, register_task

NAME = "seq_cls"  # the `model.task` of this module


def _check_columns(ds: datasets.Dataset, data_cfg: DictConfig) -> None:
    needed = [
        ("data.text_column", data_cfg.text_column),
        ("data.label_column", data_cfg.label_column),
    ]
    if data_cfg.partitioner == "natural":
        needed.append(("data.natural_column", data_cfg.natural_column))
    for field_name, col in needed:
        if col not in ds.column_names:
            raise KeyError(f"{field_name}={col!r} is not a column of the data; columns are {ds.column_names}.")


def _tokenize(texts: list[str], tokenizer: object, max_length: int) -> list[torch.Tensor]:
    enc = tokenizer(texts, truncation=True, max_length=max_length)  # type: ignore[operator]
    return [torch.tensor(ids, dtype=torch.int32) for ids in enc["input_ids"]]


def build_task_data(data_cfg: DictConfig, tokenizer: object, *, seed: int, cache_dir: str | None = None) -> TaskData:
    """Text classification: load, split (seeded shuffle; the first `test_size` are the server's test set),
    tokenise; cached."""

    def build() -> TaskData:
        ds = load_pool(data_cfg)
        _check_columns(ds, data_cfg)
        texts = [str(t) if t is not None else "" for t in ds[data_cfg.text_column]]
        labels, label_names = label_ids(ds[data_cfg.label_column], data_cfg)
        natural = [str(v) for v in ds[data_cfg.natural_column]] if data_cfg.partitioner == "natural" else None
        test_idx, train_idx = split_order(len(texts), data_cfg, seed=seed)
        public_idx = public_order(len(texts), data_cfg, seed=seed)
        val_idx = val_order(len(texts), data_cfg, seed=seed)
        chosen = np.concatenate([test_idx, train_idx, public_idx, val_idx])
        ids = _tokenize([texts[i] for i in chosen], tokenizer, data_cfg.max_length)
        n_test, n_train, n_public = len(test_idx), len(train_idx), len(public_idx)
        return TaskData(
            train=TokenizedSplit(ids[n_test : n_test + n_train], torch.from_numpy(labels[train_idx]), task=NAME),
            test=TokenizedSplit(ids[:n_test], torch.from_numpy(labels[test_idx]), task=NAME),
            label_names=label_names,
            train_labels=labels[train_idx],
            train_natural=[natural[i] for i in train_idx] if natural is not None else None,
            public=TokenizedSplit(
                ids[n_test + n_train : n_test + n_train + n_public], torch.from_numpy(labels[public_idx]), task=NAME
            )
            if len(public_idx)
            else None,
            val=TokenizedSplit(ids[n_test + n_train + n_public :], torch.from_numpy(labels[val_idx]), task=NAME)
            if len(val_idx)
            else None,
        )

    return cached_task_data(data_cfg, tokenizer, seed=seed, cache_dir=cache_dir, kind=NAME, build=build)


def collate(batch: list[tuple[torch.Tensor, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of (ids, label) to its longest sequence (dynamic padding)."""
    longest = max((len(ids) for ids, _ in batch), default=1)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, (ids, _) in enumerate(batch):
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    labels = torch.tensor([int(y) for _, y in batch], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def head_name(model: torch.nn.Module) -> str:
    """Name of the classification head module (trained and averaged by every method)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head named one of {HEAD_NAMES}.")


class Classification(Task):
    """Text -> one of `data.labels`; the head's logits against the label id."""

    name = NAME
    class_labels = True
    logit_calibration = True

    def build_model(
        self, model_cfg: DictConfig, *, num_labels: int, seed: int, cache_dir: str | None = None
    ) -> PreTrainedModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if model_cfg.name == TINY_MODEL:
                arch = model_cfg.arch
                config = BertConfig(
                    vocab_size=load_tokenizer(model_cfg, cache_dir).vocab_size,
                    hidden_size=arch.hidden_size,
                    num_hidden_layers=arch.num_layers,
                    num_attention_heads=arch.num_heads,
                    intermediate_size=arch.intermediate_size,
                    max_position_embeddings=512,
                )
                config.num_labels = num_labels
                model: PreTrainedModel = BertForSequenceClassification(config)
            else:
                model = self._pretrained(model_cfg, num_labels=num_labels, cache_dir=cache_dir)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
        model.eval()
        return model

    @staticmethod
    def _pretrained(model_cfg: DictConfig, *, num_labels: int, cache_dir: str | None) -> PreTrainedModel:
        # The load report ("classifier MISSING: newly initialized") is expected for a new head.
        try:
            return quiet_load(
                AutoModelForSequenceClassification.from_pretrained,
                resolve_name(model_cfg.name, cache_dir),
                num_labels=num_labels,
                dtype=torch.float32,  # fp32 master weights also from an fp16/bf16 checkpoint (autocast lowers them)
            )
        except (RuntimeError, ValueError) as e:
            if not any(s in str(e) for s in ("size mismatch", "shape", "mismatched_sizes")):
                raise
            raise ValueError(
                f"model.name={model_cfg.name!r} has a classification head whose size does not match the "
                f"{num_labels} classes in data.label_column. Use a base model without a head, or data with the "
                f"head's labels. ({e})"
            ) from e

    def build_data(
        self, data_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int, cache_dir: str | None = None
    ) -> TaskData:
        return build_task_data(data_cfg, tokenizer, seed=seed, cache_dir=cache_dir)

    def collate(self, batch: Sequence[tuple[Any, ...]], pad_id: int) -> Batch:
        return collate(batch, pad_id)  # type: ignore[arg-type]

    def per_example_loss(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs.logits.float(), batch["labels"], reduction="none")

    def calibrated_loss(self, shift: torch.Tensor) -> Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]:
        def loss(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            logits = outputs.logits.float() - shift.to(outputs.logits.device)
            return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

        return loss

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, split: TokenizedSplit, *, batch_size: int, pad_id: int
    ) -> dict[str, float]:
        """Mean cross-entropy and accuracy; batches of length-sorted examples (little padding)."""
        if len(split) == 0:
            raise ValueError("Cannot evaluate on an empty split.")
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
        ds = IndexedDataset(split)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = {
                k: v.to(device)
                for k, v in self.collate([ds[i] for i in order[start : start + batch_size]], pad_id).items()
            }
            out = model(**self.model_inputs(batch))
            total_loss += float(self.per_example_loss(out, batch).sum())
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        model.train(was_training)
        return {"loss": total_loss / len(split), "accuracy": correct / len(split)}

    def trained_modules(self, model: PreTrainedModel) -> list[str]:
        return [head_name(model)]


register_task(Classification())
