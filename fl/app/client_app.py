"""The Flower ClientApp: load the server's tensors, train locally, reply with the trainable tensors.

The config comes from the overrides in each message (the server's), composed with `fl.config.compose`,
so every client sees the server's config whichever way the run was started. Tensors a method keeps
frozen and sends only once (Fed-SB's A and B) are kept in the node's `Context.state`, and so are tensors a
method makes personal (the ConfigRecord's `personal-suffixes`, FedSA-LoRA's B): a client starts them from PEFT's
initialisation, keeps them as it trained them, and never takes them from the server. Per-client evaluation scores
the model a client would keep on its held-out share (`data.client_test_fraction`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from clients.attack import attack_for
from clients.drift import client_drift, finish_round
from clients.evaluate import evaluate
from clients.fedsb_init import InitSpec, init_gradient_reply
from clients.train import local_train, round_seed
from fl import constants as K
from fl.adapters import load_tensors, trainable_state
from fl.app.config import compose
from fl.app.workspace import Workspace, get_workspace
from fl.base_delta import apply_base_delta, delta_from_factors
from fl.data import IndexedDataset, client_partition, client_test_indices, hold_out
from fl.ranks import client_rank, rank_source
from fl.runtime_env import client_threads
from fl.wire import from_record, to_record
from privacy import client_plan, make_private, steps_per_round
from privacy.client_level import client_clipping_mod
from privacy.node import (
    declined_reply,
    lifetime_decline,
    load_accountant,
    node_policy,
    policy_decline,
    save_accountant,
)
from privacy.noise import noise_source
from privacy.policy import DECLINE_REASON, DECLINE_RECORD

log = logging.getLogger(__name__)

app = ClientApp()

DECLINED_CODE = 451  # an error reply's code when a node declines a task by its own policy
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


def _personal(conf: ConfigRecord) -> tuple[str, ...]:
    """Name suffixes of the tensors this client keeps as its own (`K.PERSONAL`, e.g. FedSA-LoRA's B); () if none."""
    raw = conf.get(K.PERSONAL)
    return tuple(str(x) for x in raw) if isinstance(raw, list) else ()


def _own_tensors(context: Context, ws: Workspace, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """This client's personal tensors: as it last trained them (`Context.state`), else PEFT's initialisation."""
    if K.STATE_PERSONAL in context.state.array_records:
        return from_record(context.state.array_records[K.STATE_PERSONAL])
    return {n: t.clone() for n, t in ws.initial.items() if n.endswith(suffixes)}


def _load_global(msg: Message, context: Context, ws: Workspace) -> dict[str, torch.Tensor]:
    """Put the server's tensors (and any frozen ones, sent now or kept from before) into the model, with this
    client's own personal tensors in place of any the message names; returns the trainable tensors loaded."""
    content = msg.content
    if K.FROZEN in content.array_records:  # sent once: keep for the rounds after
        context.state[K.STATE_FROZEN] = content.array_records[K.FROZEN]
    if K.STATE_FROZEN in context.state.array_records:
        load_tensors(ws.model, from_record(context.state.array_records[K.STATE_FROZEN]))
    delta = content.array_records.get(K.BASE_DELTA)
    fold = from_record(delta) if delta is not None else {}  # FedEx-LoRA's fold (absolute)
    if K.BASE_DELTA_FACTORS in content.array_records:  # the same as factor pairs (FLoRA's stacks)
        for name, d in delta_from_factors(from_record(content.array_records[K.BASE_DELTA_FACTORS])).items():
            fold[name] = fold[name] + d if name in fold else d
    apply_base_delta(ws.model, fold)
    expected = {n for n, p in ws.model.named_parameters() if p.requires_grad}
    state = from_record(content.array_records[K.ARRAYS])
    suffixes = _personal(content.config_records[K.CONFIG])
    if suffixes:  # never the server's: the client's own copy replaces anything the message holds under these names
        state = {n: t for n, t in state.items() if not n.endswith(suffixes)} | _own_tensors(context, ws, suffixes)
    load_tensors(ws.model, state, expect=expected)
    return state


def _own_rank(overrides: list[str], context: Context) -> int:
    """The LoRA rank this node trains at (`fl.ranks.client_rank`: its node config, else `sim.client_ranks`)."""
    return client_rank(compose(overrides), int(str(context.node_config[K.NODE_PARTITION_ID])), context.node_config)


def _workspace(msg: Message, context: Context) -> tuple[Workspace, int]:
    conf = msg.content.config_records[K.CONFIG]
    overrides = local_data_overrides(json.loads(str(conf[K.OVERRIDES])), dict(context.node_config))
    rank = _own_rank(overrides, context)
    same = rank == int(compose(overrides).strategy.rank)  # the server's rank: share its cached workspace
    ws = get_workspace(overrides, rank=None if same else rank, rank_key=rank_source(context.node_config))
    threads = int(ws.cfg.train.threads) or client_threads()
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return ws, int(str(conf[K.SERVER_ROUND]))


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id (used for reproducible sampling) and the LoRA rank it trains at."""
    pid = int(str(context.node_config[K.NODE_PARTITION_ID]))
    said: dict[str, int | float | list[int] | list[float]] = {K.PARTITION_ID: pid}
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
    settings = ws.privacy
    reason = policy_decline(settings, context.node_config, pid, len(data))
    if reason is None and (str(conf[K.PHASE]) == K.PHASE_INIT_GRAD or not settings.enabled):
        reason = lifetime_decline(context, settings, client_plan(settings, len(data)) if settings.enabled else None)
    if reason is not None:  # the node's own privacy policy: nothing computed from its data leaves it
        log.warning("partition %d declines round %d: %s", pid, server_round, reason)
        if str(conf[K.PHASE]) == K.PHASE_INIT_GRAD:  # the init exchange expects arrays: an error reply instead
            return Message(Error(code=DECLINED_CODE, reason=f"declined: {reason}"), reply_to=msg)
        return declined_reply(msg, partition_id=pid, server_round=server_round, reason=reason)
    if str(conf[K.PHASE]) == K.PHASE_INIT_GRAD:
        return init_gradient_reply(
            msg,
            context,
            model=ws.model,
            data=data,
            pad_id=ws.pad_id,
            pid=pid,
            spec=InitSpec.from_config(ws.cfg),
            privacy=settings,
        )
    start = _load_global(msg, context, ws)
    cfg = ws.cfg
    attack = attack_for(cfg, dict(context.node_config), pid)  # a simulated hostile client (sim.attack)
    data = attack.data(data, ws.num_labels)
    steps = steps_per_round(settings, len(data))
    seed = round_seed(int(cfg.seed), server_round, pid)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        K.PARTITION_ID: pid,
        K.SERVER_ROUND: server_round,
        K.LORA_RANK: ws.rank,
    }
    content = RecordDict()
    wrap = None
    accountant = None
    if settings.enabled:
        plan = client_plan(settings, len(data))
        accountant = load_accountant(context, msg, plan.accountant, delta=plan.delta)
        if accountant.steps == 0:  # this client's first DP round: say what it will do (node files: its own n)
            log.info("partition %d (%d examples): %s", pid, len(data), plan.describe())
        lifetime = lifetime_decline(context, settings, plan)  # after load_accountant: a resume continues its entry
        if lifetime is not None:
            log.warning("partition %d declines round %d: %s", pid, server_round, lifetime)
            return declined_reply(msg, partition_id=pid, server_round=server_round, reason=lifetime)
        noise = noise_source(context.node_config, seed=seed)  # never the server's seed on a deployment node
        if accountant.would_exceed(
            target_epsilon=plan.target_epsilon,
            delta=plan.delta,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=steps,
        ):
            spent = accountant.epsilon(plan.delta)
            why = (
                f"its privacy budget is spent: ε={spent:.4g} after {accountant.steps} steps, and {steps} more would "
                f"pass privacy.target_epsilon={plan.target_epsilon:g}"
            )
            log.warning("partition %d declines round %d: %s", pid, server_round, why)
            metrics.update({K.NUM_EXAMPLES: len(data), K.DECLINED: 1, K.EPSILON: spent})
            content[K.METRICS] = MetricRecord(metrics)
            content[DECLINE_RECORD] = ConfigRecord({DECLINE_REASON: why})
            content[K.STATE_PRIVACY] = save_accountant(context, accountant)
            return Message(content, reply_to=msg)

        def wrap(model, optimizer, loader):
            return make_private(
                model=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.max_grad_norm,
                accountant=accountant,
                poisson_sampling=settings.poisson_sampling,
                grad_sample_mode=settings.grad_sample_mode,
                clipping=settings.clipping,
                head_clip_share=settings.head_clip_share,
                noise_seed=noise.noise_seed,
                secure_mode=noise.secure,
                sampling_seed=noise.sampling_seed,
                loss_fn=ws.task_def.per_example_loss,
            )

    drift = client_drift(cfg, msg.content, context)  # drift=: FedProx, SCAFFOLD (clients.drift)
    result = local_train(
        ws.model,
        data,
        steps=steps,
        batch_size=settings.logical_batch,
        physical_batch_size=settings.physical_batch,
        lr=float(conf.get(K.LR, cfg.strategy.lr)),  # the round's rate (train.lr_schedule)
        weight_decay=float(cfg.train.weight_decay),
        pad_id=ws.pad_id,
        seed=seed,
        wrap=wrap,
        precision=str(cfg.train.precision),
        optimizer_name=str(cfg.train.optimizer),
        momentum=float(cfg.train.momentum),
        optimizer_state=_kept_optimizer_state(cfg, context),
        group_by_length=bool(cfg.train.group_by_length),
        drift=drift,
    )
    finish_round(drift, content, context)  # SCAFFOLD: Δc_i in the reply, c_i kept (from the DP-trained model)
    if cfg.train.keep_optimizer_state:  # stays on the client: under DP a function of its noised updates only
        context.state[K.STATE_OPTIMIZER] = ArrayRecord(torch_state_dict=result.optimizer_state)
    metrics.update(
        {
            K.NUM_EXAMPLES: attack.num_examples(result.num_examples),
            K.TRAIN_STEPS: result.steps,
            K.TRAIN_SECONDS: result.seconds,
            K.DECLINED: 0,
        }
    )
    if accountant is not None:
        # The training loss is an un-noised function of the client's examples: under DP it stays on the client.
        plan = client_plan(settings, len(data))
        metrics[K.EPSILON] = accountant.epsilon(plan.delta)
        metrics[K.DP_STEPS] = accountant.steps_at(plan.sample_rate)
        metrics[K.NOISE_MULTIPLIER] = plan.noise_multiplier
        metrics[K.EXAMPLES_SEEN] = result.examples_seen
        content[K.STATE_PRIVACY] = save_accountant(context, accountant)
    else:
        metrics[K.TRAIN_LOSS] = result.loss
    trained = trainable_state(ws.model)
    suffixes = _personal(conf)
    if suffixes:  # kept for the next round this client joins; its reply still carries them (the server's mean)
        context.state[K.STATE_PERSONAL] = to_record({n: t for n, t in trained.items() if n.endswith(suffixes)})
    content[K.ARRAYS] = to_record(attack.reply(trained, start, seed=seed))
    content[K.METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


def _kept_optimizer_state(cfg: DictConfig, context: Context) -> dict[str, torch.Tensor] | None:
    """The optimiser state this client kept from the last round it joined (`train.keep_optimizer_state`)."""
    if not cfg.train.keep_optimizer_state or K.STATE_OPTIMIZER not in context.state.array_records:
        return None
    return dict(context.state.array_records[K.STATE_OPTIMIZER].to_torch_state_dict())


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Per-client evaluation: the model this client would keep (the server's tensors, its own personal ones) on
    its held-out share of its partition (`data.client_test_fraction`), which it never trains on."""
    ws, _ = _workspace(msg, context)
    pid, _, held_out = _indices(context, ws)
    if node_policy(ws.privacy, context.node_config, pid).requires_dp:  # un-noised metrics of the node's own data
        reason = "this node's privacy policy does not release un-noised evaluation metrics of its data"
        return Message(Error(code=DECLINED_CODE, reason=f"declined: {reason}"), reply_to=msg)
    if len(held_out) == 0:
        share, size = float(ws.cfg.data.client_test_fraction), len(_partition(context, ws)[1])
        reason = (
            f"no held-out share to score (data.client_test_fraction={share:g}, partition {pid} trains on {size} "
            "examples; a share needs at least 2): set data.client_test_fraction > 0"
        )
        return Message(Error(code=NO_TEST_SHARE_CODE, reason=reason), reply_to=msg)
    _load_global(msg, context, ws)
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
