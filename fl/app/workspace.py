"""Per-process caches: one composed config, tokenizer, tokenised data and adapted model per run.

A Ray actor (simulation) or a ClientApp process (deployment) serves many client messages; each of them
reuses what is cached here instead of rebuilding the model or re-tokenising data every round. Clients
overwrite every trainable tensor from the server's message before training, so sharing one model
object across the virtual clients of a process is safe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import torch
from omegaconf import DictConfig
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from clients import fedsb_init
from fl import ranks
from fl.accel import resolve_device
from fl.adapters import build_adapter, check_ranks_fit, freeze_head, trainable_state
from fl.app.config import compose
from fl.data import TaskData
from fl.models import load_tokenizer
from fl.tasks import Task, get_task, load_base_model
from privacy import PrivacySettings
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
    task_def: Task  # what `model.task` means: model, data, batches, loss, metrics
    rank: int = 0  # the LoRA rank `model` was built at (a client's own in a heterogeneous federation)
    # the trainable tensors as PEFT initialised them (copies): where a client's personal tensors (FedSA-LoRA's B)
    # start before its first round, since `model` is shared by every virtual client of the process
    initial: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    @property
    def num_labels(self) -> int:
        return len(self.task.label_names)

    @cached_property
    def privacy(self) -> PrivacySettings:
        """The run's privacy settings, read once; the plan reserves the method's releases before round 1."""
        releases = get_strategy(str(self.cfg.strategy.name)).client_init_releases(self.cfg)
        return PrivacySettings.from_config(self.cfg, init_releases=releases)


_CACHE: dict[tuple[tuple[str, ...], int | None], Workspace] = {}
CACHE_SIZE = 4  # workspaces kept per process: one per rank a process serves in a heterogeneous federation


def server_init_gradient(ws: Workspace) -> dict[str, torch.Tensor]:
    """The loss gradient sum w.r.t. every adapted W0 on the server's own init data (`strategy.init_data`),
    for a method whose init needs it (Fed-SB's init=server): the strategy gets it as `server_gradient`."""
    return fedsb_init.server_init_gradient(
        ws.cfg, model=ws.model, pad_id=ws.pad_id, task=ws.task, task_def=ws.task_def, tokenizer=ws.tokenizer
    )


def get_workspace(
    overrides: list[str] | tuple[str, ...], *, rank: int | None = None, rank_key: str = ranks.RANK_KEY
) -> Workspace:
    """The cached workspace for these overrides and adapter rank (built on first use; another run's are freed).

    `rank` (default `strategy.rank`) is a client's own rank (`fl.ranks.client_rank`), named `rank_key` in errors.
    Every rank the config names must fit the model's target modules: checked before the adapter is built.
    """
    key = (tuple(overrides), rank)
    if key in _CACHE:
        return _CACHE[key]
    if any(k[0] != key[0] for k in _CACHE) or len(_CACHE) >= CACHE_SIZE:
        _CACHE.clear()
    cfg = compose(list(key[0]))
    task_def = get_task(str(cfg.model.task))
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    task = task_def.build_data(cfg.data, tokenizer, seed=int(cfg.seed), cache_dir=cfg.cache_dir)
    kind = get_strategy(cfg.strategy.name).adapter_kind
    base = load_base_model(cfg.model, num_labels=len(task.label_names), seed=int(cfg.seed), cache_dir=cfg.cache_dir)
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = task_def.trained_modules(base)
    targets = list(cfg.model.target_modules)
    check_ranks_fit(base, ranks.configured_ranks(cfg), targets=targets, modules_to_save=trained)
    base.to(resolve_device(str(cfg.train.device)))  # type: ignore[arg-type]  # before PEFT/Opacus wrap it: opacus #820
    model = build_adapter(
        base,
        kind=kind,
        strategy_cfg=cfg.strategy,
        targets=targets,
        seed=int(cfg.seed),
        modules_to_save=trained,
        rank=rank,
        rank_key=rank_key,
        layers=None if cfg.model.lora_layers is None else [int(i) for i in cfg.model.lora_layers],
    )
    if cfg.train.freeze_head:
        freeze_head(model)
    model.eval()
    ws = Workspace(
        cfg=cfg,
        overrides=key[0],
        tokenizer=tokenizer,
        task=task,
        model=model,
        kind=kind,
        task_def=task_def,
        rank=int(cfg.strategy.rank) if rank is None else int(rank),
        initial=trainable_state(model),
    )
    _CACHE[key] = ws
    return ws


def free_workspaces() -> None:
    """Drop every cached workspace (e.g. after a preflight check in a process that will not train)."""
    _CACHE.clear()
