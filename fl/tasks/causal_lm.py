"""Causal language modelling (`model.task=causal_lm`): federated instruction tuning of a decoder LM.

Adapters go on every linear projection (q, k, v, o, gate, up, down with `target_modules: [all-linear]`);
the embeddings and ``lm_head`` stay frozen, so nothing besides the adapter trains or travels. The loss is
each example's mean next-token cross-entropy over its response tokens only (prompt and padding carry
label -100). Evaluation gives the held-out response loss and perplexity and, for records whose response
is a class word (the embedded tweets), accuracy by comparing the label words' log-likelihoods given the
prompt — no generation. Records without a class report response-token accuracy instead.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from fl.data import TaskData, TokenizedSplit, cached_task_data, label_ids, split_order, val_order
from fl.models import TINY_LLAMA, load_tokenizer, quiet_load, resolve_name
from fl.tasks.base import Batch, Task, register_task
from fl.tasks.instructions import load_records, tokenize_conversations

IGNORE = -100  # label of tokens without loss (prompt, padding)


def response_labels(ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Token labels of one example: its ids with the prompt masked to -100."""
    labels = ids.clone().long()
    labels[:prompt_length] = IGNORE
    return labels


def logits_kept(labels: torch.Tensor) -> int:
    """How many last positions need logits: from the first that predicts a labelled token to the end.

    Position j's logits predict token j + 1; those last positions are passed to the model as ``logits_to_keep``
    (transformers slices the hidden states before the LM head).
    """
    scored = (labels[:, 1:] != IGNORE).any(0).nonzero()
    first = int(scored[0, 0]) if len(scored) else labels.shape[1] - 1
    return int(labels.shape[1] - first)


def accept_logits_to_keep(model: PreTrainedModel, name: str) -> PreTrainedModel:
    """`model`, checked to take ``logits_to_keep`` (`CausalLM.model_inputs` passes the positions on every forward).

    transformers' causal LMs do (Llama, Qwen, Mistral, Gemma, GPT-2, …); the few that do not (xLSTM, speech and
    music decoders) are refused here, before anything trains, rather than shimmed: a patched ``forward`` would not
    survive the model copies the framework makes.
    """
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        raise ValueError(
            f"model.name={name}: {type(model).__name__}.forward takes no `logits_to_keep`, which model.task=causal_lm "
            "passes to score only the response positions; use a transformers causal LM that takes it (Llama, Qwen, "
            "Mistral, Gemma, GPT-2 and most others do)."
        )
    return model


class CausalLM(Task):
    """Instruction -> response, next-token loss on the response."""

    name = "causal_lm"

    def build_model(
        self, model_cfg: DictConfig, *, num_labels: int, seed: int, cache_dir: str | None = None
    ) -> PreTrainedModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if model_cfg.name == TINY_LLAMA:
                arch = model_cfg.arch
                tok = load_tokenizer(model_cfg, cache_dir)
                config = LlamaConfig(
                    vocab_size=len(tok),
                    hidden_size=arch.hidden_size,
                    intermediate_size=arch.intermediate_size,
                    num_hidden_layers=arch.num_layers,
                    num_attention_heads=arch.num_heads,
                    num_key_value_heads=max(1, arch.num_heads // 2),
                    max_position_embeddings=2048,
                    tie_word_embeddings=True,
                    pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                model: PreTrainedModel = LlamaForCausalLM(config)
            else:
                model = quiet_load(
                    AutoModelForCausalLM.from_pretrained, resolve_name(model_cfg.name, cache_dir), dtype=torch.float32
                )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
        model.eval()
        return accept_logits_to_keep(model, str(model_cfg.name))

    def build_data(
        self, data_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int, cache_dir: str | None = None
    ) -> TaskData:
        def build() -> TaskData:
            rec = load_records(data_cfg)
            n = len(rec.conversations)
            if rec.classes is not None:
                classes, label_names = label_ids(rec.classes, data_cfg)
            elif data_cfg.partitioner in ("dirichlet", "pathological"):
                raise ValueError(
                    f"data.partitioner={data_cfg.partitioner} partitions by label, but the records have no "
                    f"data.label_column={data_cfg.label_column!r}; use data.partitioner=iid or natural, "
                    "or name a column."
                )
            else:
                classes, label_names = np.full(n, -1, dtype=np.int64), []
            test_idx, train_idx = split_order(n, data_cfg, seed=seed)
            val_idx = val_order(n, data_cfg, seed=seed)
            chosen = np.concatenate([test_idx, val_idx, train_idx])  # tokenise only what the run uses
            ids, lengths, kept = tokenize_conversations(
                [rec.conversations[i] for i in chosen], tokenizer, max_length=int(data_cfg.max_length)
            )
            rows = chosen[kept]
            # Label-word accuracy when every response is its record's class word (e.g. the embedded tweets).
            is_words = bool(label_names) and all(
                rec.conversations[i][-1]["content"].strip() == label_names[classes[i]] for i in rows
            )
            words = (
                tuple(tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in label_names)
                if is_words
                else None
            )
            n_test = int(np.sum(np.asarray(kept) < len(test_idx)))
            n_val = int(np.sum(np.asarray(kept) < len(test_idx) + len(val_idx))) - n_test
            tensors = [torch.tensor(x, dtype=torch.int32) for x in ids]
            plen = torch.tensor(lengths, dtype=torch.int32)

            def split(lo: int, hi: int) -> TokenizedSplit:
                return TokenizedSplit(
                    tensors[lo:hi],
                    torch.from_numpy(classes[rows[lo:hi]]),
                    task=self.name,
                    prompt_lengths=plen[lo:hi],
                    label_token_ids=words,
                )

            train_rows = rows[n_test + n_val :]
            return TaskData(
                train=split(n_test + n_val, len(rows)),
                test=split(0, n_test),
                val=split(n_test, n_test + n_val) if n_val else None,
                label_names=label_names,
                train_labels=classes[train_rows],
                train_natural=[rec.natural[i] for i in train_rows] if rec.natural is not None else None,
            )

        return cached_task_data(data_cfg, tokenizer, seed=seed, cache_dir=cache_dir, kind=self.name, build=build)

    def collate(self, batch: Sequence[tuple[Any, ...]], pad_id: int) -> Batch:
        """Right-pad (ids, class, prompt length) items; ``labels`` are the ids with prompt and padding at -100."""
        longest = max((len(item[0]) for item in batch), default=1)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
        for i, (ids, _, prompt_length) in enumerate(batch):
            input_ids[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
            labels[i, : len(ids)] = response_labels(ids, prompt_length)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> Batch:
        """The batch without ``labels``, and ``logits_to_keep``: only the positions from the first one that predicts
        a response token get vocabulary logits. The prompt's positions never carry loss, and their logits (vocab
        49,152 × ~95 prompt tokens a record on SmolLM2) were most of the LM head's work and memory, in training
        and in every evaluation (BENCHMARKS.md, "Causal LM")."""
        inputs = super().model_inputs(batch)
        length = batch["labels"].shape[1]
        inputs["logits_to_keep"] = torch.arange(length - logits_kept(batch["labels"]), length)  # positions
        return inputs

    def per_example_loss(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over each example's response tokens, shape (batch,).

        ``outputs.logits`` may hold only the last K positions (`logits_to_keep`): they predict the last K − 1 tokens.
        """
        logits = outputs.logits[:, :-1].float()
        target = batch["labels"][:, batch["labels"].shape[1] - logits.shape[1] :].to(logits.device)
        tokens = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none"
        )
        count = (target != IGNORE).sum(1).clamp(min=1)
        return tokens.sum(1) / count

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, split: TokenizedSplit, *, batch_size: int, pad_id: int
    ) -> dict[str, float]:
        """Held-out response loss (mean per example), perplexity, and accuracy (label words, else tokens)."""
        if len(split) == 0:
            raise ValueError("Cannot evaluate on an empty split.")
        assert split.prompt_lengths is not None
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        words = split.label_token_ids
        single = words is not None and all(len(w) == 1 for w in words)
        order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
        total_loss, correct, tok_right, tok_all = 0.0, 0, 0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            items = [(split.input_ids[i], int(split.labels[i]), int(split.prompt_lengths[i])) for i in idx]
            batch = {k: v.to(device) for k, v in self.collate(items, pad_id).items()}
            out = model(**self.model_inputs(batch))
            total_loss += float(self.per_example_loss(out, batch).sum())
            skipped = batch["labels"].shape[1] - out.logits.shape[1]  # positions without logits (model_inputs)
            target = batch["labels"][:, skipped + 1 :]
            pred = out.logits[:, :-1].argmax(-1)
            tok_right += int(((pred == target) & (target != IGNORE)).sum())
            tok_all += int((target != IGNORE).sum())
            if words is None:
                continue
            if single:  # one forward: the first response position scores every one-token label word
                first = torch.tensor([w[0] for w in words], device=device)
                rows = torch.arange(len(idx), device=device)
                at = torch.tensor([p for _, _, p in items], device=device) - 1 - skipped
                scores = out.logits[rows, at].float().log_softmax(-1)[:, first]
            else:
                scores = self._word_scores(model, items, words, pad_id=pad_id, device=device)
            correct += int((scores.argmax(-1).cpu() == torch.tensor([c for _, c, _ in items])).sum())
        model.train(was_training)
        loss = total_loss / len(split)
        acc = correct / len(split) if words is not None else tok_right / max(tok_all, 1)
        return {"loss": loss, "accuracy": acc, "perplexity": math.exp(min(loss, 50.0))}

    def _word_scores(
        self,
        model: torch.nn.Module,
        items: list[tuple[torch.Tensor, int, int]],
        words: tuple[tuple[int, ...], ...],
        *,
        pad_id: int,
        device: torch.device,
    ) -> torch.Tensor:
        """log p(word | prompt) summed over each word's tokens, shape (batch, words): one forward per word."""
        cols = []
        for w in words:
            cand = [(torch.cat([ids[:p], torch.tensor(w, dtype=ids.dtype)]), 0, p) for ids, _, p in items]
            batch = {k: v.to(device) for k, v in self.collate(cand, pad_id).items()}
            out = model(**self.model_inputs(batch))
            cols.append(-self.per_example_loss(out, batch) * len(w))
        return torch.stack(cols, dim=1)

    def trained_modules(self, model: PreTrainedModel) -> list[str]:
        return []  # embeddings and lm_head stay frozen


register_task(CausalLM())
