"""Sequence classification (`model.task=seq_cls`): an encoder with a classification head over text labels.

The head is new (seeded) and trained and averaged in full by every method (PEFT ``modules_to_save``);
the loss is the cross-entropy of the head's logits; evaluation gives mean loss and accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fl.data import IndexedDataset, TaskData, TokenizedSplit, build_task_data, collate
from fl.models import HEAD_NAMES, TINY_MODEL, _quiet_load, load_tokenizer, resolve_name
from fl.tasks.base import Batch, Task, register_task


def head_name(model: torch.nn.Module) -> str:
    """Name of the classification head module (trained and averaged by every method)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head named one of {HEAD_NAMES}.")


class Classification(Task):
    """Text -> one of `data.labels`; the head's logits against the label id."""

    name = "seq_cls"

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
            return _quiet_load(
                AutoModelForSequenceClassification.from_pretrained,
                resolve_name(model_cfg.name, cache_dir),
                num_labels=num_labels,
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
