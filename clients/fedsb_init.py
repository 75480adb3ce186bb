"""Fed-SB's initialisation on a client (and the server's own init gradient): ∇ w.r.t. every adapted W0.

The client sums ∇_{W0} loss over `strategy.init_examples` of its examples (a seeded choice) with the
adapter switched off, so the gradient G_k is taken at the pretrained weights. What it sends depends on the
server's `init-step`: G_k itself (dense init), or a sketch of it — G_k·M or G_kᵀ·Q per module, the
exchanges of a federated randomized range finder (Halko, Martinsson & Tropp 2011; `fl.sketch`).
Under DP every release is one Gaussian step at q = 1 on the clipped per-example gradients, made and charged by
the client's privacy session (`privacy.session.ClientPrivacy.gaussian_release`). Nothing here knows a Workspace:
the app passes the model, data and session in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message, MetricRecord, RecordDict
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from fl import constants as K
from fl.data import IndexedDataset, TaskData
from fl.sketch import contraction, sketch_width, test_matrix
from fl.tasks import Task, get_task
from fl.wire import from_record, to_record
from privacy import noisy_gradient_sum
from privacy.session import ClientPrivacy

log = logging.getLogger(__name__)

BASE_SUFFIX = ".base_layer.weight"
PUBLIC = "public"  # strategy.init_data=public: the run's data.public_size slice


def init_examples(data: IndexedDataset, *, count: int, seed: int) -> IndexedDataset:
    """A seeded subset of at most `count` of the client's examples."""
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(data))[: min(count, len(data))]
    return IndexedDataset(data.split, data.indices[np.sort(pick)])


def gradient_sum(
    model: torch.nn.Module, data: IndexedDataset, *, batch_size: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Σ over `data` of ∇ loss w.r.t. each adapted layer's frozen base weight, adapter disabled.

    The loss is the data's task's per-example loss (`fl.tasks`), summed over examples.
    """
    task = get_task(data.split.task)
    device = next(model.parameters()).device
    bases = {n: p for n, p in model.named_parameters() if n.endswith(BASE_SUFFIX)}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in bases.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        model.eval()  # no dropout: the gradient of the pretrained model itself
        with model.disable_adapter():  # type: ignore[operator]
            for start in range(0, len(data), batch_size):
                items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
                batch = {k: v.to(device) for k, v in task.collate(items, pad_id).items()}
                task.loss_of(model, batch).sum().backward()
        return {n: p.grad.detach().cpu().clone() for n, p in bases.items() if p.grad is not None}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])


def clipped_gradient_sum(
    model: torch.nn.Module, subset: IndexedDataset, *, pad_id: int, max_grad_norm: float
) -> dict[str, torch.Tensor]:
    """Σ_i clip_C(∇_{W0} loss_i) over `subset`, adapter disabled, no noise (noise is added per release).

    `model` is a PEFT model; the loss is the subset's task's (`fl.tasks.Task.loss_of`).
    """
    bases = {n: p for n, p in model.named_parameters() if n.endswith(BASE_SUFFIX)}
    task = get_task(subset.split.task)
    batches = [
        task.collate([subset[i] for i in range(s, min(s + 16, len(subset)))], pad_id) for s in range(0, len(subset), 16)
    ]
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # PEFT's disable_adapter() re-enables requires_grad on every adapter tensor when it exits
    # (set_adapter), which would unfreeze Fed-SB's A and B: restore the flags after the context.
    with model.disable_adapter():  # type: ignore[operator]
        grads = noisy_gradient_sum(
            model=model,
            params=bases,
            batches=batches,
            max_grad_norm=max_grad_norm,
            noise_multiplier=0.0,
            loss_fn=task.loss_of,
        )
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    return {n: g.cpu() for n, g in grads.items()}  # like gradient_sum: the release maths and the wire are on CPU


def sketch_release(
    grads: Mapping[str, torch.Tensor],
    step: str,
    *,
    mats: Mapping[str, torch.Tensor] | None,
    seed: int,
    rank: int,
    oversample: int,
) -> dict[str, torch.Tensor]:
    """What a client sends for one init exchange, before any noise.

    `dense`: G_k. `sketch-right`: G_k·M per module, M = the server's matrix or, when none is sent, the
    seeded test matrix Ω. `sketch-left`: G_kᵀ·Q. Every M and Q goes through `contraction` (spectral norm
    ≤ 1), so a release never amplifies a clipped gradient (DP sensitivity ≤ C whatever the server sends).
    """
    if step == K.INIT_STEP_DENSE:
        return dict(grads)
    out: dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        d_out, d_in = g.shape
        if mats is None:
            m = test_matrix(d_in, sketch_width(d_out, d_in, rank=rank, oversample=oversample), seed=seed, name=name)
        elif name in mats:
            m = contraction(mats[name])
        else:
            raise ValueError(f"Fed-SB init: the server sent no sketch matrix for {name!r}.")
        want = d_in if step == K.INIT_STEP_RIGHT else d_out
        if step not in (K.INIT_STEP_RIGHT, K.INIT_STEP_LEFT) or m.shape[0] != want:
            raise ValueError(f"Fed-SB init: step {step!r} with a {tuple(m.shape)} matrix for {name!r} {(d_out, d_in)}.")
        gd = g.double()
        out[name] = (gd @ m if step == K.INIT_STEP_RIGHT else gd.T @ m).float()
    return out


@dataclass(frozen=True)
class InitSpec:
    """What a client's Fed-SB init release takes from the run config (`from_config`)."""

    examples: int  # strategy.init_examples: examples of the client's partition the gradient is taken over
    seed: int  # the run seed: which examples, the test matrix Ω, and the release's noise
    rank: int  # strategy.rank r
    oversample: int  # strategy.sketch_oversample p (the sketch has r + p columns)
    batch_size: int  # train.batch_size: examples per pass of the un-noised gradient sum

    @classmethod
    def from_config(cls, cfg: DictConfig) -> InitSpec:
        """From a composed Fed-SB config (`strategy.init_examples`, `rank`, `sketch_oversample`)."""
        s = cfg.strategy
        return cls(
            examples=int(s.init_examples),
            seed=int(cfg.seed),
            rank=int(s.rank),
            oversample=int(s.sketch_oversample),
            batch_size=int(cfg.train.batch_size),
        )


def init_gradient_reply(
    msg: Message,
    *,
    model: torch.nn.Module,
    data: IndexedDataset,
    pad_id: int,
    pid: int,
    spec: InitSpec,
    privacy: ClientPrivacy,
) -> Message:
    """Reply to one of the server's init exchanges (`init-step`) with this client's release.

    Under DP each example's gradient (jointly over every module) is clipped to C = `privacy.max_grad_norm`
    first; the release is then (Σ_i clip(G_i))·M = Σ_i clip(G_i)·M plus N(0, (σC)²) per entry, and M has
    spectral norm ≤ 1, so one example moves it by at most C: one Gaussian step at sample rate 1
    (`ClientPrivacy.gaussian_release`), charged to the client's accountant. The plan reserves
    `privacy.init_releases` such releases; a request beyond them is refused.

    Parameters
    ----------
    msg : Message
        The server's init request.
    model : torch.nn.Module
        The client's PEFT model (Fed-SB adapter); its adapter is switched off for the gradient.
    data : IndexedDataset
        The client's partition; `spec.examples` of it (seeded by `spec.seed` + `pid`) are used.
    pad_id : int
        Token id used for padding.
    pid : int
        The client's partition id.
    spec : InitSpec
        The init's settings from the run config.
    privacy : ClientPrivacy
        This client's privacy session for `msg` (DP releases when the run's privacy is enabled).
    """
    conf = msg.content.config_records[K.CONFIG]
    step = str(conf.get(K.INIT_STEP, K.INIT_STEP_DENSE))
    exchange = int(str(conf.get(K.INIT_EXCHANGE, 0)))
    mats = from_record(msg.content.array_records[K.ARRAYS]) if K.ARRAYS in msg.content.array_records else None
    subset = init_examples(data, count=spec.examples, seed=spec.seed + pid)
    content = RecordDict()
    metrics: dict[str, int | float | list[int] | list[float]] = {K.NUM_EXAMPLES: len(subset), K.PARTITION_ID: pid}

    def release_of(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return sketch_release(grads, step, mats=mats, seed=spec.seed, rank=spec.rank, oversample=spec.oversample)

    if privacy.enabled:

        def clipped(clip: float) -> dict[str, torch.Tensor]:
            return release_of(clipped_gradient_sum(model, subset, pad_id=pad_id, max_grad_norm=clip))

        seed = spec.seed * 7919 + pid + 104_729 * exchange  # the simulation's noise seed (privacy.noise)
        release = privacy.gaussian_release(clipped, exchange=exchange, seed=seed)
        metrics[K.EPSILON] = privacy.epsilon
        content[K.STATE_PRIVACY] = privacy.save()
    else:
        release = release_of(gradient_sum(model, subset, batch_size=spec.batch_size, pad_id=pad_id))
    content[K.ARRAYS] = to_record(release)
    content[K.METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


def server_init_data(
    cfg: DictConfig, *, task: TaskData, task_def: Task, tokenizer: PreTrainedTokenizerBase
) -> IndexedDataset:
    """`strategy.init_data`, tokenised like the run's data (same columns and labels), for init=server.

    ``public``: the run's own public slice (`data.public_size`, in no client's partition). Otherwise a file,
    read through the task's `build_data` (file source, no held-out split); at most
    `init_examples × sim.num_clients` examples (seeded), the total a federated init would use. The run's
    evaluation split is never used: a file that is the run's own `data.path` is refused.

    Parameters
    ----------
    cfg : DictConfig
        The run config (Fed-SB's `strategy.init_data` and `init_examples`, `data`, `sim.num_clients`, `seed`).
    task : TaskData
        The run's tokenised data (its public slice and label names).
    task_def : Task
        The run's task, which reads and tokenises the server's file.
    tokenizer : PreTrainedTokenizerBase
        The run's tokenizer.
    """
    path = cfg.strategy.init_data
    if not path:
        raise ValueError("strategy.init=server needs strategy.init_data=PATH (the server's own data file).")
    count = int(cfg.strategy.init_examples) * int(cfg.sim.num_clients)
    if str(path) == PUBLIC:  # the run's public slice: in no client's partition and not the evaluation split
        if task.public is None or len(task.public) == 0:
            raise ValueError(
                "strategy.init_data=public needs a public slice: set data.public_size (e.g. 640) on a "
                "classification task, or give the server's own file as strategy.init_data=PATH."
            )
        return init_examples(IndexedDataset(task.public), count=count, seed=int(cfg.seed))
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"strategy.init_data={str(path)!r}: no such file. Give a CSV/JSON/JSONL/Parquet file.")
    if (
        cfg.data.source == "file"
        and cfg.data.path
        and Path(str(cfg.data.path)).expanduser().resolve() == file.resolve()
    ):
        raise ValueError(
            f"strategy.init_data={str(path)!r} is the run's data.path, which holds the held-out evaluation split; "
            "give the server a separate file."
        )
    data_cfg = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    assert isinstance(data_cfg, DictConfig)
    data_cfg.update(
        {
            "source": "file",
            "path": str(file),
            "test_size": 0,
            "public_size": 0,
            "val_size": 0,  # the server's own init file: all of it, none held out
            "max_examples": None,
            "labels": task.label_names,
        }
    )
    own = task_def.build_data(data_cfg, tokenizer, seed=int(cfg.seed), cache_dir=cfg.cache_dir)
    return init_examples(IndexedDataset(own.train), count=count, seed=int(cfg.seed))


def server_init_gradient(
    cfg: DictConfig,
    *,
    model: torch.nn.Module,
    pad_id: int,
    task: TaskData,
    task_def: Task,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, torch.Tensor]:
    """init=server: Σ of ∇_{W0} loss over the server's own `strategy.init_data` (`server_init_data`), adapter
    disabled, by base-weight name; no client is asked and nothing is privatised (the server's own data).

    `model` is the server's PEFT model; `task`, `task_def` and `tokenizer` as in `server_init_data`; the sum runs
    in passes of `train.batch_size` examples.
    """
    data = server_init_data(cfg, task=task, task_def=task_def, tokenizer=tokenizer)
    log.info("Fed-SB init=server: gradient on %d examples of %s", len(data), cfg.strategy.init_data)
    return gradient_sum(model, data, batch_size=int(cfg.train.batch_size), pad_id=pad_id)
