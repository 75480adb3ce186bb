"""The Flower ClientApp: load the server's tensors, train locally, reply with the trainable tensors.

The config comes from the overrides in each message (the server's), composed with `fl.config.compose`, so every
client sees the server's config whichever way the run was started. What a client keeps between rounds is
`fl.app.client_state`'s; its privacy (policy, budgets, accountant, DP-SGD) `privacy.session.ClientPrivacy`'s.
Per-client evaluation scores the model a client would keep on its held-out share (`data.client_test_fraction`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from clients.attack import attack_for
from clients.calibration import calibrated_loss
from clients.drift import client_drift, finish_round
from clients.evaluate import evaluate
from clients.fedsb_init import InitSpec, init_gradient_reply
from clients.train import local_train, round_seed
from fl import constants as K
from fl.adapters import trainable_state
from fl.app.client_state import keep_after_round, kept_optimizer_state, load_global, personal_suffixes
from fl.app.config import compose
from fl.app.workspace import CACHE_SIZE, Workspace, get_workspace
from fl.data import IndexedDataset, client_partition, client_test_indices, hold_out
from fl.ranks import client_rank, rank_source
from fl.runtime_env import client_threads
from fl.wire import to_record
from privacy.session import ClientPrivacy, Metrics, client_clipping_mod, evaluation_decline

app = ClientApp()

NO_TEST_SHARE_CODE = 422  # an evaluate message to a client that holds no held-out share


def local_data_overrides(overrides: list[str], node_config: dict[str, Any]) -> list[str]:
    """The run's overrides as this node composes them: with `--node-config "data-path=FILE"` the node reads
    its own CSV/JSON/JSONL/Parquet file (same `data.text_column`/`data.label_column`/`data.labels`) and trains
    on all of it, instead of a partition of a pool every node holds a copy of."""
    path = node_config.get(K.NODE_DATA_PATH)
    if not path:
        return overrides
    own = ["data.source=file", f"data.path={path}", "data.test_size=0", "data.val_size=0", "data.max_examples=null"]
    return [*overrides, *own]  # the server's test and validation splits are the server's, not carved from a node's


def _indices(context: Context, ws: Workspace) -> tuple[int, np.ndarray, np.ndarray]:
    """(partition id, training indices, held-out indices) into `ws.task.train` (`data.client_test_fraction`)."""
    pid = int(str(context.node_config[K.NODE_PARTITION_ID]))
    if context.node_config.get(K.NODE_DATA_PATH):  # the node's own file, whole (less its held-out share)
        share = float(ws.cfg.data.client_test_fraction)
        return pid, *hold_out(np.arange(len(ws.task.train)), share, seed=int(ws.cfg.seed), pid=pid)
    n = int(str(context.node_config.get(K.NODE_NUM_PARTITIONS, ws.cfg.sim.num_clients)))
    if n != ws.cfg.sim.num_clients:
        raise ValueError(
            f"This node was started with num-partitions={n} but sim.num_clients={ws.cfg.sim.num_clients}; "
            "start every SuperNode with --node-config 'partition-id=i num-partitions=N' matching the run."
        )
    where = {"pid": pid, "num_partitions": n, "seed": int(ws.cfg.seed)}
    return pid, client_partition(ws.task, ws.cfg.data, **where), client_test_indices(ws.task, ws.cfg.data, **where)


def _partition(context: Context, ws: Workspace) -> tuple[int, IndexedDataset]:
    """(partition id, the examples this client trains on)."""
    pid, train, _ = _indices(context, ws)
    return pid, IndexedDataset(ws.task.train, train)


@lru_cache(maxsize=CACHE_SIZE)
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """The run config, composed (every layer's checks) once per overrides and process, not once per message."""
    return compose(list(overrides))


def _own_rank(overrides: list[str], context: Context) -> int:
    """The LoRA rank this node trains at (`fl.ranks.client_rank`: its node config, else `sim.client_ranks`)."""
    pid = int(str(context.node_config[K.NODE_PARTITION_ID]))
    return client_rank(_composed(tuple(overrides)), pid, context.node_config)


def _workspace(msg: Message, context: Context) -> tuple[Workspace, int]:
    conf = msg.content.config_records[K.CONFIG]
    overrides = local_data_overrides(json.loads(str(conf[K.OVERRIDES])), dict(context.node_config))
    rank = _own_rank(overrides, context)
    same = rank == int(_composed(tuple(overrides)).strategy.rank)  # the server's rank: share its cached workspace
    ws = get_workspace(overrides, rank=None if same else rank, rank_key=rank_source(context.node_config))
    threads = int(ws.cfg.train.threads) or client_threads()
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return ws, int(str(conf[K.SERVER_ROUND]))


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id (used for reproducible sampling) and the LoRA rank it trains at."""
    pid = int(str(context.node_config[K.NODE_PARTITION_ID]))
    said: Metrics = {K.PARTITION_ID: pid}
    conf = msg.content.config_records.get(K.CONFIG)
    if conf is not None and K.OVERRIDES in conf:
        said[K.LORA_RANK] = _own_rank(json.loads(str(conf[K.OVERRIDES])), context)
    return Message(RecordDict({K.METRICS: MetricRecord(said)}), reply_to=msg)


@app.train(mods=[client_clipping_mod])  # a no-op unless the server's wrapper asks the node to clip (privacy=client)
def train(msg: Message, context: Context) -> Message:
    """One round of local training (or, in phase init-grad, Fed-SB's init gradient)."""
    ws, server_round = _workspace(msg, context)
    pid, data = _partition(context, ws)
    conf = msg.content.config_records[K.CONFIG]
    privacy = ClientPrivacy(ws.privacy, msg=msg, context=context, partition_id=pid, num_examples=len(data))
    init = str(conf[K.PHASE]) == K.PHASE_INIT_GRAD
    declined = privacy.decline(init=init)  # the node's own privacy policy: nothing computed from its data leaves it
    if declined is not None:
        return declined
    if init:
        spec = InitSpec.from_config(ws.cfg)
        return init_gradient_reply(
            msg, model=ws.model, data=data, pad_id=ws.pad_id, pid=pid, spec=spec, privacy=privacy
        )
    start = load_global(msg, context, ws)
    cfg = ws.cfg
    attack = attack_for(cfg, dict(context.node_config), pid)  # a simulated hostile client (sim.attack)
    data = attack.data(data, ws.num_labels)
    seed = round_seed(int(cfg.seed), server_round, pid)
    metrics: Metrics = {K.PARTITION_ID: pid, K.SERVER_ROUND: server_round, K.LORA_RANK: ws.rank}
    declined = privacy.open_round(seed=seed, metrics=metrics)  # its budgets, under DP
    if declined is not None:
        return declined
    drift = client_drift(cfg, msg.content, context)  # drift=: FedProx, SCAFFOLD (clients.drift)
    result = local_train(
        ws.model,
        data,
        steps=privacy.steps,
        batch_size=ws.privacy.logical_batch,
        physical_batch_size=ws.privacy.physical_batch,
        lr=float(conf.get(K.LR, cfg.strategy.lr)),  # the round's rate (train.lr_schedule)
        weight_decay=float(cfg.train.weight_decay),
        pad_id=ws.pad_id,
        seed=seed,
        wrap=privacy.wrap(ws.task_def.per_example_loss),
        precision=str(cfg.train.precision),
        optimizer_name=str(cfg.train.optimizer),
        momentum=float(cfg.train.momentum),
        optimizer_state=kept_optimizer_state(cfg, context),
        group_by_length=bool(cfg.train.group_by_length),
        drift=drift,
        loss_fn=calibrated_loss(ws.task_def, data, ws.num_labels, float(cfg.train.fedlc_tau)),  # FedLC, else None
    )
    content = RecordDict()
    finish_round(drift, content, context)  # SCAFFOLD: Δc_i in the reply, c_i kept (from the DP-trained model)
    metrics[K.NUM_EXAMPLES] = attack.num_examples(result.num_examples)
    metrics.update({K.TRAIN_STEPS: result.steps, K.TRAIN_SECONDS: result.seconds, K.DECLINED: 0})
    metrics.update(privacy.round_metrics(examples_seen=result.examples_seen, loss=result.loss))
    if privacy.enabled:
        content[K.STATE_PRIVACY] = privacy.save()
    trained = trainable_state(ws.model)
    keep_after_round(
        context, cfg, trained=trained, suffixes=personal_suffixes(conf), optimizer_state=result.optimizer_state
    )
    content[K.ARRAYS] = to_record(attack.reply(trained, start, seed=seed))
    content[K.METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Per-client evaluation: the model this client would keep (the server's tensors, its own personal ones) on
    its held-out share of its partition (`data.client_test_fraction`), which it never trains on."""
    ws, _ = _workspace(msg, context)
    pid, _, held_out = _indices(context, ws)
    declined = evaluation_decline(ws.privacy, msg, context, pid)  # un-noised metrics of the node's own data
    if declined is not None:
        return declined
    if len(held_out) == 0:
        share, size = float(ws.cfg.data.client_test_fraction), len(_partition(context, ws)[1])
        reason = (
            f"no held-out share to score (data.client_test_fraction={share:g}, partition {pid} trains on {size} "
            "examples; a share needs at least 2): set data.client_test_fraction > 0"
        )
        return Message(Error(code=NO_TEST_SHARE_CODE, reason=reason), reply_to=msg)
    load_global(msg, context, ws)
    split = ws.task.train.subset(held_out)
    loss, acc = evaluate(
        ws.model,
        split,
        batch_size=int(ws.cfg.train.eval_batch_size),
        pad_id=ws.pad_id,
        precision=str(ws.cfg.train.precision),
    )
    metrics = MetricRecord(
        {K.PARTITION_ID: pid, K.NUM_EXAMPLES: len(held_out), K.EVAL_LOSS: loss, K.EVAL_ACCURACY: acc}
    )
    return Message(RecordDict({K.METRICS: metrics}), reply_to=msg)
