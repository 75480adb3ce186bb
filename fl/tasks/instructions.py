"""Instruction/response records for causal-LM tuning: load, check, format with the chat template, tokenise.

Record shapes (a local JSON/JSONL/Parquet/CSV file or a Hugging Face dataset, `data.source=file|hf`):

- Alpaca: ``data.instruction_column`` (required), ``data.input_column`` (optional context),
  ``data.response_column`` (required) -> one user turn and one assistant turn.
- Chat: ``data.messages_column``, a list of ``{"role", "content"}`` ending with the assistant's response.

`data.source=tweets` (the default) turns each shipped tweet into the instruction `TWEET_INSTRUCTION` whose
response is its sentiment word, so accuracy is measurable offline. Every record is checked before anything
trains; a bad one fails naming its index and field. The prompt (everything before the last assistant turn,
with the template's generation prompt) and the response are tokenised separately, so the prompt length is
exact and only response tokens carry loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from fl.data import load_pool

log = logging.getLogger(__name__)

TWEET_INSTRUCTION = "Classify the sentiment of this tweet. Answer with one word: {choices}.\n\nTweet: {text}"
ROLES = ("system", "user", "assistant")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Records:
    """Conversations (each ending with the assistant's response) and, if known, each one's class."""

    conversations: list[Messages]
    classes: list[str] | None  # raw class values (partitioning by label; label-word accuracy)
    natural: list[str] | None  # natural-id column, if configured


def _choices(words: Sequence[str]) -> str:
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def _tweet_records(data_cfg: DictConfig) -> Records:
    ds = load_pool(data_cfg)
    # list(): a datasets Column indexed one element at a time cost ~4.5 s of CPU per call on the 38k tweets, ~0.4 s so
    texts, labels = list(ds["text"]), [str(v) for v in ds["label"]]
    words = [str(v) for v in data_cfg.labels] if data_cfg.labels is not None else sorted(set(labels))
    keep = [i for i, t in enumerate(texts) if t is not None and str(t).strip()]
    if len(keep) < len(texts):
        log.info("Skipping %d empty tweets of the embedded corpus", len(texts) - len(keep))
    convs = [
        [
            {"role": "user", "content": TWEET_INSTRUCTION.format(choices=_choices(words), text=str(texts[i]).strip())},
            {"role": "assistant", "content": labels[i]},
        ]
        for i in keep
    ]
    return Records(convs, [labels[i] for i in keep], None)


def _text(value: Any, *, index: int, field: str, required: bool) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        if required:
            raise ValueError(f"data record {index}: field {field!r} is missing (it must hold non-empty text).")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"data record {index}: field {field!r} must be text, got {type(value).__name__}.")
    if required and not value.strip():
        raise ValueError(f"data record {index}: field {field!r} is empty (it must hold non-empty text).")
    return value


def _chat(value: Any, *, index: int, field: str) -> Messages:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"data record {index}: field {field!r} must be a non-empty list of {{role, content}} turns.")
    out: Messages = []
    for j, turn in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise ValueError(f"data record {index}: field {where!r} needs a role in {ROLES} and a content.")
        out.append(
            {
                "role": str(turn["role"]),
                "content": _text(turn.get("content"), index=index, field=f"{where}.content", required=True),
            }
        )
    if out[-1]["role"] != "assistant":
        raise ValueError(f"data record {index}: field {field!r} must end with an assistant turn (the response).")
    if not any(t["role"] == "user" for t in out[:-1]):
        raise ValueError(f"data record {index}: field {field!r} has no user turn before the response.")
    return out


def load_records(data_cfg: DictConfig) -> Records:
    """Every record as a conversation, checked (see the module docstring)."""
    if data_cfg.source == "tweets":
        rec = _tweet_records(data_cfg)
        return Records(_with_system(rec.conversations, data_cfg), rec.classes, rec.natural)
    ds = load_pool(data_cfg)
    cols = ds.column_names
    rows = ds.to_list()
    if data_cfg.messages_column in cols:
        convs = [
            _chat(r[data_cfg.messages_column], index=i, field=data_cfg.messages_column) for i, r in enumerate(rows)
        ]
    elif data_cfg.instruction_column in cols or data_cfg.response_column in cols:
        convs = [_alpaca(r, index=i, data_cfg=data_cfg) for i, r in enumerate(rows)]
    else:
        raise KeyError(
            f"The data has neither data.messages_column={data_cfg.messages_column!r} nor Alpaca fields "
            f"(data.instruction_column={data_cfg.instruction_column!r}, data.response_column="
            f"{data_cfg.response_column!r}); its columns are {cols}."
        )
    classes = [str(r[data_cfg.label_column]) for r in rows] if data_cfg.label_column in cols else None
    natural = None
    if data_cfg.partitioner == "natural":
        if data_cfg.natural_column not in cols:
            raise KeyError(
                f"data.natural_column={data_cfg.natural_column!r} is not a column of the data; columns are {cols}."
            )
        natural = [str(r[data_cfg.natural_column]) for r in rows]
    return Records(_with_system(convs, data_cfg), classes, natural)


def _alpaca(row: dict[str, Any], *, index: int, data_cfg: DictConfig) -> Messages:
    instruction = _text(
        row.get(data_cfg.instruction_column), index=index, field=data_cfg.instruction_column, required=True
    )
    context = _text(row.get(data_cfg.input_column), index=index, field=data_cfg.input_column, required=False)
    response = _text(row.get(data_cfg.response_column), index=index, field=data_cfg.response_column, required=True)
    prompt = f"{instruction}\n\n{context}" if context.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _with_system(convs: list[Messages], data_cfg: DictConfig) -> list[Messages]:
    if not data_cfg.system_prompt:
        return convs
    system = {"role": "system", "content": str(data_cfg.system_prompt)}
    return [c if c[0]["role"] == "system" else [system, *c] for c in convs]


def tokenize_conversations(
    convs: Sequence[Messages], tokenizer: PreTrainedTokenizerBase, *, max_length: int
) -> tuple[list[list[int]], list[int], list[int]]:
    """(token ids, prompt lengths, kept record indices); records whose prompt fills `max_length` are dropped."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set model.tokenizer "
            "to one that has (e.g. an -Instruct model's)."
        )
    prompts, responses = [], []
    for i, conv in enumerate(convs):
        prompt = tokenizer.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conv, tokenize=False)
        assert isinstance(prompt, str) and isinstance(full, str)
        if not full.startswith(prompt):
            raise ValueError(
                f"data record {i}: the chat template does not render the prompt as a prefix of the conversation; "
                "use a tokenizer whose template appends turns (model.tokenizer)."
            )
        prompts.append(prompt)
        responses.append(full[len(prompt) :])
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    ids, lengths, kept = [], [], []
    for i, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
        if len(p) >= max_length:
            continue
        ids.append(list(p) + list(r)[: max_length - len(p)])
        lengths.append(len(p))
        kept.append(i)
    if not kept:
        raise ValueError(f"Every prompt is at least data.max_length={max_length} tokens long; raise data.max_length.")
    if len(kept) < len(convs):
        log.warning(
            "%d of %d records have prompts of data.max_length=%d tokens or more and are dropped; "
            "raise data.max_length.",
            len(convs) - len(kept),
            len(convs),
            max_length,
        )
    return ids, lengths, kept
