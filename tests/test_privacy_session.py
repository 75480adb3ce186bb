"""The client's privacy front door (`privacy.session.ClientPrivacy`) and the DP-SGD wiring under it.

Pinned here: our order of operations against Opacus' PEFT trap (LoRA tensors silently corrupted when the model
moves to its device after `get_peft_model`: the workspace moves the base first), one accountant record for training
and Fed-SB's init release (both load it at the plan's δ), and the engine's hygiene (our per-layer optimizer class
built as such, the process' warning filters left as they were).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.train import make_loader
from fl import constants as K
from fl.adapters import trainable_state
from fl.app.client_app import train
from fl.app.config import compose
from fl.app.workspace import get_workspace
from fl.data import IndexedDataset
from fl.wire import from_record, to_record
from privacy import DPSGD, ClientAccountant, PrivacySettings, private_round, release
from privacy.clipping import PerLayerOptimizer
from privacy.session import ClientPrivacy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _message(overrides: list[str], content: RecordDict) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # a Message needs a run
    conf = {K.SERVER_ROUND: 1, K.PHASE: K.PHASE_TRAIN, K.OVERRIDES: json.dumps(overrides)}
    content[K.CONFIG] = ConfigRecord(conf)
    return Message(content, 1, MessageType.TRAIN)


def _context(state: RecordDict | None = None) -> Context:
    node = {K.NODE_PARTITION_ID: 0, K.NODE_NUM_PARTITIONS: 2, "privacy-secure-rng": "false"}
    return Context(run_id=3, node_id=1, node_config=node, state=state or RecordDict(), run_config={})


@pytest.mark.parametrize("device", DEVICES)
def test_one_dp_step_moves_the_trained_lora_tensors_by_adams_first_step_and_nothing_else(
    tiny: list[str], one_thread: None, device: str
) -> None:
    """Opacus' PEFT trap: a model moved to its device after `get_peft_model` trains LoRA tensors Opacus no longer
    sees, so they come back unchanged or corrupt. Through the real path (workspace, ClientApp, session, Opacus), one
    DP-SGD step moves every trained tensor (LoRA A and B, the head) by AdamW's first step, at most lr (plus weight
    decay) per entry, finitely; every frozen weight keeps its value; and the reply carries what the model holds."""
    job = [*tiny, "strategy=fedit", "strategy.rank=2", "sim.num_clients=2", "data.partitioner=iid"]
    job += [f"train.device={device}", "privacy=dp", "privacy.batch_size=16", "privacy.local_steps=1"]
    ws = get_workspace(job)
    params = dict(ws.model.named_parameters())
    assert all(p.device.type == device for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}
    trained = {n for n, p in params.items() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and any("lora_B" in n for n in trained)
    assert all(float(before[n].abs().sum()) == 0.0 for n in trained if "lora_B" in n)  # PEFT starts B at zero

    reply = train(_message(job, RecordDict({K.ARRAYS: to_record(trainable_state(ws.model))})), _context())

    metrics = reply.content.metric_records[K.METRICS]
    assert metrics[K.DP_STEPS] == 1 and metrics[K.TRAIN_STEPS] == 1 and 0 < float(str(metrics[K.EPSILON])) < math.inf
    lr, decay = float(ws.cfg.strategy.lr), float(ws.cfg.train.weight_decay)
    assert str(ws.cfg.train.optimizer) == "adamw"
    for name, p in params.items():
        after, start = p.detach(), before[name]
        if name not in trained:
            assert torch.equal(after, start), f"frozen {name} changed"
            continue
        step = (after - start).abs()
        assert bool(torch.isfinite(after).all()), name
        assert float(step.max()) > 0, f"trained {name} did not move"
        bound = lr * (1 + decay * float(start.abs().max())) * (1 + 1e-4)  # Adam's first step: ±lr per entry
        assert float(step.max()) <= bound, f"{name} moved {float(step.max()):.3g} > {bound:.3g}"
    sent = from_record(reply.content.array_records[K.ARRAYS])
    assert set(sent) == trained
    assert all(torch.equal(sent[n].to(device), params[n].detach()) for n in sent)


def test_training_and_the_init_release_charge_the_record_that_spent_most_at_the_plans_delta() -> None:
    """The node keeps one accountant; copies (its Context.state, the server's after a resume) are ranked by ε at the
    plan's δ. Here the two records rank the other way round at δ = 1e-5 (the init path's old default): at the plan's
    δ = 1/(10n) = 0.01 the server's copy has spent more, so the init release is charged to it."""
    state = ClientAccountant()  # PRV (the default): ε(1e-5) = 6.63 > 6.44, ε(0.01) = 3.00 < 3.63
    state.step(noise_multiplier=1.0, sample_rate=0.2, steps=20)
    server = ClientAccountant()
    server.step(noise_multiplier=0.72, sample_rate=1.0, steps=1)  # 0.7 under RDP (ranks differently under PRV)
    assert state.epsilon(1e-5) > server.epsilon(1e-5) and state.epsilon(0.01) < server.epsilon(0.01)
    settings = PrivacySettings.from_config(compose(["privacy=dp", "train.batch_size=4"]), init_releases=2)
    msg = _message([], RecordDict({K.STATE_PRIVACY: server.to_config_record()}))
    context = _context(RecordDict({K.STATE_PRIVACY: state.to_config_record()}))
    session = ClientPrivacy(settings, msg=msg, context=context, partition_id=0, num_examples=10)
    assert session.plan is not None and session.plan.delta == pytest.approx(0.01)
    assert session.accountant.state_dict() == server.state_dict()

    released = session.gaussian_release(lambda clip: {"g": torch.zeros(4)}, exchange=1, seed=0)
    record = session.save()
    assert released["g"].shape == (4,) and not torch.equal(released["g"], torch.zeros(4))  # noised
    kept = ClientAccountant.from_config_record(context.state.config_records[K.STATE_PRIVACY])
    assert kept.state_dict() == ClientAccountant.from_config_record(record).state_dict()
    assert kept.steps_at(1.0) == 2 and kept.steps_at(0.2) == 0  # the server's record, one init release more
    with pytest.raises(ValueError, match="beyond the 2 init releases"):
        session.gaussian_release(lambda clip: {"g": torch.zeros(4)}, exchange=2, seed=0)


def test_a_dp_round_builds_our_per_layer_optimizer_and_leaves_the_warning_filters_alone(
    tiny: list[str], one_thread: None
) -> None:
    """Per-layer clipping runs `PerLayerOptimizer` (no class swapped at run time), and torch's full-backward-hook
    notice is silenced only around the round's backward passes, not for the rest of the process."""
    ws = get_workspace([*tiny, "strategy=fedit", "strategy.rank=2"])
    model = ws.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    data = IndexedDataset(ws.task.train, torch.arange(16).numpy())
    loader = make_loader(data, batch_size=8, pad_id=ws.pad_id, seed=0)
    mechanism = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, clipping="per_layer")
    filters = list(warnings.filters)
    acc = ClientAccountant()
    private = private_round(
        model,
        torch.optim.SGD(params, lr=0.1),
        loader,
        mechanism=mechanism,
        accountant=acc,
        loss_fn=ws.task_def.per_example_loss,
    )
    try:
        assert type(private.optimizer) is PerLayerOptimizer
        batch = next(b for b in private.data_loader if len(b["labels"]))
        private.objective(private.module(**ws.task_def.model_inputs(batch)), batch).backward()
        private.optimizer.step()
    finally:
        release(private.module)
        model.eval()
    assert acc.steps == 1 and warnings.filters == filters
    with pytest.raises(ValueError, match="per_layer with hooks or functorch"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, clipping="per_layer", grad_sample_mode="ghost")
