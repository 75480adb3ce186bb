"""Fed-SB's initialisations without Ray: the real server (`FedSB.prepare`) talking to the real client code
(`init_gradient_reply`) through an in-process grid. Sketch = single-party sketch of Σ G_k, bad replies
rejected, init_fraction, init=server, DP sensitivity and ε against Opacus, config validation."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import PRVAccountant

from clients.fedsb_init import (
    BASE_SUFFIX,
    InitSpec,
    clipped_gradient_sum,
    gradient_sum,
    init_examples,
    init_gradient_reply,
    server_init_data,
    sketch_release,
)
from fl import constants as K
from fl.adapters import A_SUFFIX, SB_B_SUFFIX, SB_R_SUFFIX, fixed_state, trainable_state
from fl.app.config import compose
from fl.app.workspace import Workspace, get_workspace, server_init_gradient
from fl.data import IndexedDataset, client_partition
from fl.wire import from_record, to_record
from privacy import ClientAccountant, PrivacySettings, client_plan
from privacy.session import ClientPrivacy
from strategies import get_strategy
from strategies.fed_sb import FedSB
from strategies.lora_math import fedsb_init_factors
from strategies.sketch_math import orthonormal_basis, range_finder, sketch_factors, sketch_width, test_matrix

test_matrix.__test__ = False  # type: ignore[attr-defined]

R, CLIENTS = 4, 3


@pytest.fixture(autouse=True, scope="module")
def task_identity() -> None:
    """Messages can only be built inside a run; give them one."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class FakeGrid:
    """A grid whose nodes answer with the framework's own client code, in this process."""

    def __init__(self, overrides: list[str], *, clients: int, tamper: dict[int, str] | None = None) -> None:
        self.overrides, self.clients, self.tamper = overrides, clients, tamper or {}
        self.contexts = {
            100 + pid: Context(run_id=1, node_id=100 + pid, node_config={}, state=RecordDict(), run_config={})
            for pid in range(clients)
        }
        self.train_msgs: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, msgs: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in msgs:
            node = msg.metadata.dst_node_id
            pid = node - 100
            if msg.metadata.message_type == MessageType.QUERY:
                replies.append(Message(RecordDict({K.METRICS: MetricRecord({K.PARTITION_ID: pid})}), reply_to=msg))
                continue
            self.train_msgs.append(msg)
            ws = get_workspace(self.overrides)
            reply = init_reply(msg, self.contexts[node], ws, partition(ws, pid, self.clients), pid=pid)
            replies.append(self._tampered(reply, self.tamper.get(pid)))
        return replies

    @staticmethod
    def _tampered(reply: Message, how: str | None) -> Message:
        if how is None:
            return reply
        state = from_record(reply.content.array_records[K.ARRAYS])
        name = sorted(state)[0]
        state[name] = torch.full_like(state[name], math.nan) if how == "nan" else state[name][:, :-1]
        reply.content[K.ARRAYS] = to_record(state)
        return reply


def init_reply(msg: Message, context: Context, ws: Workspace, data: IndexedDataset, *, pid: int) -> Message:
    """What the ClientApp does with an init request."""
    privacy = ClientPrivacy(ws.privacy, msg=msg, context=context, partition_id=pid, num_examples=len(data))
    return init_gradient_reply(
        msg, model=ws.model, data=data, pad_id=ws.pad_id, pid=pid, spec=InitSpec.from_config(ws.cfg), privacy=privacy
    )


def fedsb(ws: Workspace, overrides: list[str]) -> FedSB:
    """The server's strategy, built as the ServerApp builds it."""
    strategy = FedSB.from_config(
        ws.cfg, overrides=overrides, fixed=fixed_state(ws.model), server_gradient=lambda: server_init_gradient(ws)
    )
    assert isinstance(strategy, FedSB)
    return strategy


def server_data(ws: Workspace) -> IndexedDataset:
    return server_init_data(ws.cfg, task=ws.task, task_def=ws.task_def, tokenizer=ws.tokenizer)


def partition(ws: Workspace, pid: int, clients: int) -> IndexedDataset:
    idx = client_partition(ws.task, ws.cfg.data, pid=pid, num_partitions=clients, seed=int(ws.cfg.seed))
    return IndexedDataset(ws.task.train, idx)


def overrides_for(tiny: list[str], *extra: str) -> list[str]:
    return [
        *tiny,
        "strategy=fed_sb",
        f"strategy.rank={R}",
        f"sim.num_clients={CLIENTS}",
        "data.partitioner=iid",
        "strategy.init_examples=8",
        *extra,
    ]


def prepared(overrides: list[str], *, clients: int = CLIENTS, tamper: dict[int, str] | None = None):  # type: ignore[no-untyped-def]
    ws = get_workspace(overrides)
    grid = FakeGrid(overrides, clients=clients, tamper=tamper)
    strategy = fedsb(ws, overrides)
    arrays = strategy.prepare(grid, to_record(trainable_state(ws.model)))  # type: ignore[arg-type]
    return ws, grid, strategy, from_record(arrays)


def client_gradients(ws: Workspace, pids: Iterable[int], clients: int = CLIENTS) -> list[dict[str, torch.Tensor]]:
    out = []
    for pid in pids:
        sub = init_examples(partition(ws, pid, clients), count=int(ws.cfg.strategy.init_examples), seed=pid)
        out.append({n: g.double() for n, g in gradient_sum(ws.model, sub, batch_size=8, pad_id=ws.pad_id).items()})
    return out


def products(fixed: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B·R0·A per module (invariant to the factors' signs)."""
    out = {}
    for key in fixed:
        if key.endswith(A_SUFFIX):
            p = key[: -len(A_SUFFIX)]
            out[p + BASE_SUFFIX] = (
                fixed[p + SB_B_SUFFIX].double() @ state[p + SB_R_SUFFIX].double() @ fixed[key].double()
            )
    return out


def sketched_reference(grads: list[dict[str, torch.Tensor]], *, seed: int = 0, p: int = 8, q: int = 0):  # type: ignore[no-untyped-def]
    g = {n: sum(c[n] for c in grads) for n in grads[0]}
    omega = {
        n: test_matrix(t.shape[1], sketch_width(*t.shape, rank=R, oversample=p), seed=seed, name=n)
        for n, t in g.items()
    }
    basis, proj = range_finder(
        {n: t @ omega[n] for n, t in g.items()},
        left=lambda m: {n: g[n].T @ m[n] for n in m},
        right=lambda m: {n: g[n] @ m[n] for n in m},
        power_iters=q,
    )
    out = {}
    for n in g:
        a, b, r0 = sketch_factors(basis[n], proj[n], rank=R, lr=1e-3)
        out[n] = b.double() @ r0.double() @ a.double()
    return out


@pytest.mark.parametrize("power_iters", [1])  # q = 0 is checked by the bad-reply tests against the same reference
def test_sketch_init_over_the_wire_equals_the_sketch_of_the_summed_gradient(tiny: list[str], power_iters: int) -> None:
    overrides = overrides_for(tiny, "strategy.init=sketch", f"strategy.sketch_power_iters={power_iters}")
    ws, grid, strategy, state = prepared(overrides)
    ref = sketched_reference(client_gradients(ws, range(CLIENTS)), q=power_iters)
    got = products(strategy.fixed, state)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-7, rtol=1e-3)  # float32 on the wire
    st = strategy.stats[0]
    assert st.extra["init_exchanges"] == 2 + 2 * power_iters and st.extra["init_clients"] == CLIENTS
    assert len(grid.train_msgs) == CLIENTS * (2 + 2 * power_iters)
    dense = sum(int(t.numel()) for t in ref.values())
    sketch = sum(sketch_width(*t.shape, rank=R, oversample=8) * sum(t.shape) for t in ref.values())
    assert st.floats_up == CLIENTS * (1 + power_iters) * sketch < CLIENTS * dense * (1 + power_iters)
    assert st.bytes_down > 0  # Q (and W) are sent; Ω is not


@pytest.mark.parametrize("how", ["nan", "shape"])
def test_a_bad_sketch_reply_is_rejected_and_the_init_goes_on_without_it(tiny: list[str], how: str) -> None:
    overrides = overrides_for(tiny, "strategy.init=sketch")
    ws, grid, strategy, state = prepared(overrides, tamper={1: how})
    st = strategy.stats[0]
    assert st.rejected == 1 and st.extra["init_clients"] == CLIENTS - 1
    assert len(grid.train_msgs) == CLIENTS + CLIENTS - 1  # the bad client is not asked again
    ref = sketched_reference(client_gradients(ws, [0, 2]))
    for n, t in products(strategy.fixed, state).items():
        torch.testing.assert_close(t, ref[n], atol=1e-7, rtol=1e-3)


def test_the_init_fails_clearly_when_no_client_is_usable(tiny: list[str]) -> None:
    with pytest.raises(RuntimeError, match="no client sent a usable 'sketch-right' reply"):
        prepared(overrides_for(tiny, "strategy.init=sketch"), tamper={0: "nan", 1: "shape", 2: "nan"})


@pytest.mark.parametrize("init", ["federated", "sketch"])
def test_init_fraction_asks_only_a_seeded_sample(tiny: list[str], init: str) -> None:
    overrides = overrides_for(tiny, f"strategy.init={init}", "strategy.init_fraction=0.5", "sim.num_clients=4")
    _, grid, strategy, _ = prepared(overrides, clients=4)
    asked = {m.metadata.dst_node_id for m in grid.train_msgs}
    assert len(asked) == 2 == strategy.stats[0].extra["init_clients"]
    _, grid2, _, _ = prepared(overrides, clients=4)
    assert {m.metadata.dst_node_id for m in grid2.train_msgs} == asked  # seeded


def test_server_init_uses_the_server_file_and_no_client(tiny: list[str], tmp_path: Path) -> None:
    rows = [
        {"text": f"great day number {i}" if i % 2 else f"awful news {i}", "label": ["positive", "negative"][i % 2]}
        for i in range(12)
    ]
    path = tmp_path / "server.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = overrides_for(tiny, "strategy.init=server", f"strategy.init_data={path}")
    ws, grid, strategy, state = prepared(overrides)
    assert grid.train_msgs == [] and strategy.stats[0].bytes_up == 0
    data = server_data(ws)
    assert len(data) == 12
    grads = gradient_sum(ws.model, data, batch_size=8, pad_id=ws.pad_id)
    for n, t in products(strategy.fixed, state).items():
        a, b, r0 = fedsb_init_factors(grads[n], rank=R, lr=1e-3)
        torch.testing.assert_close(t, b.double() @ r0.double() @ a.double(), atol=1e-6, rtol=1e-4)


def test_a_public_slice_is_in_no_partition_and_is_what_init_server_public_uses(tiny: list[str]) -> None:
    from fl.data import partition_indices, public_order, split_order

    overrides = overrides_for(tiny, "strategy.init=server", "strategy.init_data=public", "data.public_size=40")
    ws, grid, strategy, state = prepared(overrides)
    assert grid.train_msgs == [] and strategy.stats[0].bytes_up == 0  # no client was asked
    task, cfg = ws.task, ws.cfg
    assert task.public is not None and len(task.public) == 40
    pool = 38158  # the embedded tweets (tiny runs read the same pool; data.max_examples trims its train part)
    test_idx, train_idx = split_order(pool, cfg.data, seed=int(cfg.seed))
    public_idx = public_order(pool, cfg.data, seed=int(cfg.seed))
    assert len(public_idx) == 40 and not set(public_idx) & (set(test_idx) | set(train_idx))
    parts = partition_indices(task, cfg.data, num_partitions=int(cfg.sim.num_clients), seed=int(cfg.seed))
    assert sum(len(p) for p in parts) == len(task.train)  # the clients hold the train pool, nothing else
    data = server_data(ws)
    assert data.split is task.public and len(data) == min(40, int(cfg.strategy.init_examples) * CLIENTS)
    grads = gradient_sum(ws.model, data, batch_size=8, pad_id=ws.pad_id)
    for name, t in products(strategy.fixed, state).items():
        a, b, r0 = fedsb_init_factors(grads[name], rank=R, lr=1e-3)
        torch.testing.assert_close(t, b.double() @ r0.double() @ a.double(), atol=1e-6, rtol=1e-4)


def test_server_init_names_the_field_when_the_file_is_missing(tiny: list[str], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"strategy\.init_data"):
        prepared(overrides_for(tiny, "strategy.init=server", f"strategy.init_data={tmp_path / 'nope.csv'}"))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["strategy.init=dense"], r"strategy.init='dense' is invalid: use one of \['federated', 'sketch'"),
        (["strategy.sketch_oversample=-1"], "strategy.sketch_oversample"),
        (["strategy.sketch_power_iters=-1"], "strategy.sketch_power_iters"),
        (["strategy.init_fraction=0"], "strategy.init_fraction"),
        (["strategy.init_fraction=1.5"], "strategy.init_fraction"),
        (["strategy.init=server"], "strategy.init_data=None is invalid: strategy.init=server needs"),
        (["strategy.init=server", "strategy.init_data=public"], r"no public slice: set data\.public_size"),
        (["data.public_size=-1"], r"data\.public_size=-1 is invalid"),
    ],
)
def test_bad_init_config_is_refused_naming_the_field(extra: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compose(["strategy=fed_sb", *extra])


@pytest.mark.parametrize(
    ("extra", "releases"),
    [
        (["strategy=fed_sb", "strategy.init=federated"], 1),
        (["strategy=fed_sb", "strategy.init=sketch"], 2),
        (["strategy=fed_sb", "strategy.init=sketch", "strategy.sketch_power_iters=2"], 6),
        (["strategy=fed_sb", "strategy.init=server", "strategy.init_data=x.csv"], 0),
        (["strategy=fed_sb", "strategy.init=random"], 0),
        (["strategy=fedit"], 0),
    ],
)
def test_the_dp_plan_reserves_every_init_release(extra: list[str], releases: int) -> None:
    cfg = compose([*extra, "privacy=dp"])
    init_releases = get_strategy(str(cfg.strategy.name)).client_init_releases(cfg)
    assert init_releases == releases
    assert client_plan(PrivacySettings.from_config(cfg, init_releases=init_releases), 200).init_steps == releases


def _flat_norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))


def test_one_examples_share_of_every_dp_sketch_release_is_at_most_c(tiny: list[str]) -> None:
    """Per-example sensitivity: release(D) − release(D without example i) has norm ≤ C, for Ω, an honest
    orthonormal Q, and a matrix a dishonest server scaled up (the client's contraction caps it)."""
    ws = get_workspace(overrides_for(tiny, "strategy.init=sketch"))
    data = init_examples(partition(ws, 0, CLIENTS), count=5, seed=0)
    c = 1e-3  # far below the tiny model's per-example gradient norms: every example is clipped
    full = clipped_gradient_sum(ws.model, data, pad_id=ws.pad_id, max_grad_norm=c)
    gen = torch.Generator().manual_seed(0)
    honest = {
        n: orthonormal_basis(torch.randn(g.shape[0], 8, generator=gen, dtype=torch.float64)) for n, g in full.items()
    }
    evil = {n: 50.0 * torch.randn(g.shape[0], 8, generator=gen) for n, g in full.items()}
    args = {"seed": 0, "rank": R, "oversample": 8}
    for i in range(len(data)):
        rest = IndexedDataset(data.split, data.indices[[j for j in range(len(data)) if j != i]])
        without = clipped_gradient_sum(ws.model, rest, pad_id=ws.pad_id, max_grad_norm=c)
        for step, mats in [(K.INIT_STEP_RIGHT, None), (K.INIT_STEP_LEFT, honest), (K.INIT_STEP_LEFT, evil)]:
            a = sketch_release(full, step, mats=mats, **args)  # type: ignore[arg-type]
            b = sketch_release(without, step, mats=mats, **args)  # type: ignore[arg-type]
            assert _flat_norm({n: a[n] - b[n] for n in a}) <= c * (1 + 1e-4)
        dense = _flat_norm({n: full[n] - without[n] for n in full})
        assert dense == pytest.approx(c, rel=1e-3)  # the example was clipped to exactly C: the bound is tight


def test_dp_sketch_charges_each_release_as_opacus_would(tiny: list[str]) -> None:
    """ε after the 4 releases of a sketch with one power iteration = Opacus' PRV accountant (the default since
    issue 41; RDP before), 4 steps at q = 1 and the plan's σ_init (`privacy.init_share`), which keeps them within
    that share of ε."""
    overrides = overrides_for(tiny, "strategy.init=sketch", "strategy.sketch_power_iters=1", "privacy=dp")
    ws, grid, strategy, _ = prepared(overrides)
    for pid in range(CLIENTS):
        plan = client_plan(ws.privacy, len(partition(ws, pid, CLIENTS)))
        ref = PRVAccountant()
        assert plan.init_noise_multiplier is not None and plan.init_share is not None  # privacy=dp's default share
        for _ in range(4):
            ref.step(noise_multiplier=plan.init_noise_multiplier, sample_rate=1.0)
        record = grid.contexts[100 + pid].state.config_records[K.STATE_PRIVACY]
        got = ClientAccountant.from_config_record(record).epsilon(plan.delta)
        with np.errstate(divide="ignore"):  # q = 1: Opacus takes log(1 - q) = log 0 on purpose
            assert got == pytest.approx(float(ref.get_epsilon(delta=plan.delta)), rel=1e-9)
        assert got <= plan.init_share * plan.target_epsilon * (1 + 1e-6)  # the init's share of the budget
    assert strategy.stats[0].extra["epsilon_max"] == pytest.approx(
        max(
            ClientAccountant.from_config_record(ctx.state.config_records[K.STATE_PRIVACY]).epsilon(
                client_plan(ws.privacy, len(partition(ws, ctx.node_id - 100, CLIENTS))).delta
            )
            for ctx in grid.contexts.values()
        )
    )


def test_a_dp_client_refuses_an_init_release_beyond_its_plan(tiny: list[str]) -> None:
    overrides = overrides_for(tiny, "strategy.init=sketch", "privacy=dp")
    ws = get_workspace(overrides)
    strategy = fedsb(ws, overrides)
    conf = strategy.config_record(0, K.PHASE_INIT_GRAD)
    conf[K.INIT_STEP], conf[K.INIT_EXCHANGE] = K.INIT_STEP_RIGHT, 2
    msg = Message(RecordDict({K.CONFIG: conf}), 100, MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=100, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="beyond the 2 init releases"):
        init_reply(msg, ctx, ws, partition(ws, 0, CLIENTS), pid=0)
    # a server that restarts the count is refused too: the client counts the releases in its own accountant
    conf[K.INIT_EXCHANGE] = 0
    spent = ClientAccountant("rdp")
    spent.step(noise_multiplier=1.0, sample_rate=1.0, steps=2)
    ctx.state[K.STATE_PRIVACY] = spent.to_config_record()
    with pytest.raises(ValueError, match="2 init releases made"):
        init_reply(msg, ctx, ws, partition(ws, 0, CLIENTS), pid=0)


def _dense_dp_releases(tiny: list[str], node_config: dict[str, str], count: int = 2) -> list[dict[str, torch.Tensor]]:
    """Fed-SB's dense DP init release of partition 0, `count` times, each to a fresh node with `node_config`."""
    overrides = overrides_for(tiny, "strategy.init=federated", "privacy=dp")
    ws = get_workspace(overrides)
    msg = Message(
        RecordDict({K.CONFIG: fedsb(ws, overrides).config_record(0, K.PHASE_INIT_GRAD)}), 100, MessageType.TRAIN
    )
    data = partition(ws, 0, CLIENTS)
    return [
        from_record(
            init_reply(
                msg, Context(run_id=1, node_id=100, node_config=node_config, state=RecordDict(), run_config={}),
                ws, data, pid=0,
            ).content.array_records[K.ARRAYS]
        )
        for _ in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("simulated", [False, True])
def test_a_deployed_nodes_dp_init_release_is_not_a_function_of_what_the_server_knows(
    tiny: list[str], monkeypatch: pytest.MonkeyPatch, simulated: bool
) -> None:
    """The init's noise was seeded from the run seed and the partition id, both the server's: it could regenerate
    the noise and subtract it. A deployment node now seeds it itself (privacy.noise); a simulation still reproduces."""
    if simulated:
        monkeypatch.setenv("FEDLORA_SIMULATION", "1")
    else:
        monkeypatch.delenv("FEDLORA_SIMULATION", raising=False)
    first, again = _dense_dp_releases(tiny, {"privacy-secure-rng": "false"})
    assert all(torch.equal(first[k], again[k]) for k in first) is simulated


def test_a_secure_node_draws_its_init_noise_from_the_csprng_as_opacus_secure_mode_does(
    tiny: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchcsprng has no build for this torch, so a stand-in module checks the wiring: the release asks the node's
    CSPRNG for its generator (Opacus' `create_random_device_generator`) and draws with Opacus' secure noise."""
    import sys
    import types

    made: list[str] = []

    def create_random_device_generator(path: str) -> torch.Generator:
        made.append(path)
        return torch.Generator().manual_seed(len(made))

    monkeypatch.setitem(
        sys.modules, "torchcsprng", types.SimpleNamespace(create_random_device_generator=create_random_device_generator)
    )
    monkeypatch.delenv("FEDLORA_SIMULATION", raising=False)
    first, again = _dense_dp_releases(tiny, {"privacy-secure-rng": "true"})
    assert made == ["/dev/urandom", "/dev/urandom"]
    assert not all(torch.equal(first[k], again[k]) for k in first)  # the stand-in gave each node its own stream


def test_sketch_init_in_a_whole_run_costs_less_than_dense_and_trains(tiny: list[str], tmp_path: Path) -> None:
    """A whole run of this file's init: init=sketch, 2 clients, 2 rounds, in-process (the round-0 exchange is the
    same ServerApp/ClientApp messages on Ray; a Ray run cost ~40 s of the suite's CPU)."""
    from loop_grid import LoopGrid

    from fl.app.server_app import run_server
    from fl.outputs import read_metrics

    overrides = [*overrides_for(tiny, "strategy.init=sketch", "sim.rounds=2"), "sim.num_clients=2"]
    run_dir = run_server(LoopGrid(2), [*overrides, f"run_dir={tmp_path / 'run'}"])
    rows = read_metrics(run_dir)
    ws = get_workspace(overrides)
    shapes = [tuple(p.shape) for n, p in ws.model.named_parameters() if n.endswith(BASE_SUFFIX)]
    dense = 2 * sum(o * i for o, i in shapes)
    sketch = 2 * sum(sketch_width(o, i, rank=R, oversample=8) * (o + i) for o, i in shapes)
    assert rows[0]["floats_up"] == sketch < dense and rows[0]["init_exchanges"] == 2
    assert 4 * sketch < rows[0]["bytes_up"] < 4 * dense
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trains from the sketched start
    assert all(r["residual"] < 1e-5 for r in rows[1:])  # Fed-SB's aggregation stays exact
    from simulations.report import load_runs

    assert load_runs(run_dir)[0]["strategy"] == f"Fed-SB r={R} (sketch init)"  # fl-report tells the inits apart
