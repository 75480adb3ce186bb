"""Per-process caches: one composed config, tokenizer, tokenised data and adapted model per run.

A Ray actor (simulation) or a ClientApp process (deployment) serves many client messages; each of them
reuses what is cached here instead of rebuilding the model or re-tokenising data every round. Clients
overwrite every trainable tensor from the server's message before training, so sharing one model
object across the virtual clients of a process is safe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fl.adapters import build_adapter
from fl.config import compose
from fl.data import TaskData, build_task_data
from fl.models import load_base_model, load_tokenizer
from strategies import get_strategy

log = logging.getLogger(__name__)


@dataclass
class Workspace:
    """Everything a party builds once per run and process."""

    cfg: DictConfig
    overrides: tuple[str, ...]
    tokenizer: PreTrainedTokenizerBase
    task: TaskData
    model: PeftModel
    kind: str

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    @property
    def num_labels(self) -> int:
        return len(self.task.label_names)

    def fresh_base(self) -> torch.nn.Module:
        """A new base model like the one `model` wraps (for export)."""
        return load_base_model(self.cfg.model, num_labels=self.num_labels, seed=int(self.cfg.seed))


_CACHE: dict[tuple[str, ...], Workspace] = {}


def get_workspace(overrides: list[str] | tuple[str, ...]) -> Workspace:
    """The cached workspace for these overrides (built on first use; the previous run's is freed)."""
    key = tuple(overrides)
    if key in _CACHE:
        return _CACHE[key]
    _CACHE.clear()
    cfg = compose(list(key))
    tokenizer = load_tokenizer(cfg.model)
    task = build_task_data(cfg.data, tokenizer, seed=int(cfg.seed), cache_dir=cfg.cache_dir)
    kind = get_strategy(cfg.strategy.name).adapter_kind
    base = load_base_model(cfg.model, num_labels=len(task.label_names), seed=int(cfg.seed))
    model = build_adapter(
        base,
        kind=kind,
        strategy_cfg=cfg.strategy,
        targets=list(cfg.model.target_modules),
        seed=int(cfg.seed),
    )
    model.eval()
    ws = Workspace(cfg=cfg, overrides=key, tokenizer=tokenizer, task=task, model=model, kind=kind)
    _CACHE[key] = ws
    return ws
