"""Client drift control (`drift=`; `clients.drift`, `strategies.scaffold`): FedProx's gradient and SCAFFOLD's c_i / c
updates on hand-checkable numbers, DP-SGD's ε unchanged by either, the config errors and refusals, and a resumed
`drift=scaffold` + `server_opt=adam` run (the real ServerApp and ClientApp in-process through `LoopGrid`) ending
where the uninterrupted one does, with c's bytes counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from loop_grid import LoopGrid

from clients.drift import FedProx, Scaffold, control_delta, proximal_gradient
from clients.train import local_train
from fl import constants as K
from fl.adapters import build_adapter
from fl.app.config import compose
from fl.app.server_app import run_server
from fl.checkpoint import Checkpoint
from fl.data import IndexedDataset, TokenizedSplit
from fl.outputs import read_metrics
from fl.tasks import get_task, load_base_model
from fl.wire import from_record, to_record
from privacy import ClientAccountant, make_private
from strategies.scaffold import ScaffoldServer
from strategies.screening import screen
from strategies.stats import RoundStats

NODES = 3


def _sgd_step(drift: FedProx | Scaffold, w: torch.nn.Parameter, grads: list[list[float]], lr: float) -> None:
    """Plain SGD on one parameter through `drift`'s hooks, one step per gradient."""
    opt = torch.optim.SGD([w], lr=lr)
    drift.attach(opt, {"w": w})
    for g in grads:
        w.grad = torch.tensor(g)
        opt.step()
    drift.detach()


def test_fedprox_adds_mu_times_the_distance_to_the_global_tensors() -> None:
    assert torch.equal(
        proximal_gradient(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0]), 0.5), torch.tensor([1.0, -1.0])
    )
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    prox = FedProx(mu=0.5)
    # step 1 starts at w_global (no pull): w = [1, 2] − 0.1·[2, −4] = [0.8, 2.4]
    # step 2: gradient [2, −4] + 0.5·([0.8, 2.4] − [1, 2]) = [1.9, −3.8]; w = [0.8, 2.4] − 0.1·[1.9, −3.8]
    _sgd_step(prox, w, [[2.0, -4.0], [2.0, -4.0]], lr=0.1)
    torch.testing.assert_close(w.detach(), torch.tensor([0.61, 2.78]))
    assert prox.steps == 2


def test_scaffold_client_corrects_each_step_and_estimates_c_i_as_the_mean_gradient() -> None:
    """SGD, K = 2, η = 0.1: y = x − η·Σ(g_k + c − c_i), so Δc_i = (x − y)/(Kη) − c = mean(g) − c_i and
    c_i⁺ = mean(g) (option II's estimate is the client's mean gradient)."""
    c, c_i = {"w": torch.tensor([0.5, -0.5])}, {"w": torch.tensor([0.25, 0.0])}
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    client = Scaffold(c, c_i)
    _sgd_step(client, w, [[1.0, 2.0], [3.0, -2.0]], lr=0.1)
    # step 1: g + c − c_i = [1.25, 1.5]; step 2: [3.25, −2.5]; y = [1, 1] − 0.1·[4.5, −1.0] = [0.55, 1.1]
    torch.testing.assert_close(w.detach(), torch.tensor([0.55, 1.1]))
    delta = client.delta()
    torch.testing.assert_close(delta["w"], torch.tensor([1.75, 0.0]))  # mean(g) − c_i = [2, 0] − [0.25, 0]
    torch.testing.assert_close(c_i["w"] + delta["w"], torch.tensor([2.0, 0.0]))
    no_step = control_delta({"w": w}, {"w": w}, c, steps=0, lr=0.1)
    assert torch.equal(no_step["w"], torch.zeros(2))  # a client that took no step changes nothing
    with pytest.raises(ValueError, match="do not name the trained tensors"):
        Scaffold({"v": torch.zeros(2)}, {"v": torch.zeros(2)}).attach(torch.optim.SGD([w], lr=0.1), {"w": w})


def _reply(partition: int, delta: list[float] | None, *, round_: int = 1) -> Message:
    content = RecordDict({K.ARRAYS: to_record({"w": torch.zeros(2)})})
    content[K.METRICS] = MetricRecord({K.NUM_EXAMPLES: 10, K.SERVER_ROUND: round_, K.PARTITION_ID: partition})
    if delta is not None:
        content[K.SCAFFOLD_DELTA] = to_record({"w": torch.tensor(delta)})
    LoopGrid(0)  # sets the run a Message needs
    return Message(content, reply_to=Message(RecordDict(), 100 + partition, MessageType.TRAIN))


def test_scaffold_server_averages_delta_c_over_all_clients_and_screens_the_extra_record() -> None:
    server = ScaffoldServer(num_clients=4)
    server.begin({"w": (2,)})
    stats = RoundStats()
    msgs = [_reply(0, [1.0, 2.0]), _reply(1, [3.0, -2.0]), _reply(2, None), _reply(3, [float("nan"), 0.0])]
    where = {100 + p: p for p in range(4)}
    replies = screen(1, msgs, expected={"w": (2,)}, stats=stats, partition_of=where, records=server.reply_records())
    assert [r.partition for r in replies] == [0, 1] and stats.rejected == 2  # no Δc_i, a NaN in Δc_i
    server.absorb(replies, stats)
    torch.testing.assert_close(server.c["w"], torch.tensor([1.0, 0.0]))  # (1/N)·Σ Δc_i with N = 4, not 2
    assert stats.floats_up == 4 and stats.extra[K.SCAFFOLD_C_NORM] == pytest.approx(1.0)
    again = ScaffoldServer(num_clients=4)
    again.load_state_dict(server.state_dict())
    content = RecordDict()
    again.attach(content, 1, resumed=True)  # after a resume, a client gets its own c_i back (once)
    assert torch.equal(from_record(content.array_records[K.SCAFFOLD_CLIENT])["w"], torch.tensor([3.0, -2.0]))
    assert torch.equal(from_record(content.array_records[K.SCAFFOLD_C])["w"], server.c["w"])
    later = RecordDict()
    again.attach(later, 1, resumed=True)
    assert K.SCAFFOLD_CLIENT not in later
    with pytest.raises(ValueError, match="SCAFFOLD state has type"):
        again.load_state_dict({"type": "fedlora-server-opt"})


def _tiny(cfg: Any, n: int = 32) -> tuple[torch.nn.Module, IndexedDataset]:
    base = load_base_model(cfg.model, num_labels=3, seed=0)
    model = build_adapter(base, kind="lora", strategy_cfg=cfg.strategy, targets=["all-linear"], seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 300, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen) for _ in range(n)]
    return model, IndexedDataset(TokenizedSplit(ids, torch.randint(0, 3, (n,), generator=gen)))


def test_fedprox_and_scaffold_cost_no_epsilon_under_dp_sgd() -> None:
    """The same DP-SGD round (same data, seeds and noise) without drift control, with FedProx and with SCAFFOLD: the
    accountant records the same steps and ε, while the trained tensors differ (the terms acted, on the released
    gradient)."""
    cfg = compose(["model=tiny", "strategy.rank=2", "strategy.dropout=0.0"])
    trained, charged = [], []
    for control in ("none", "fedprox", "scaffold"):
        model, data = _tiny(cfg)
        acc = ClientAccountant("rdp")
        gen = torch.Generator().manual_seed(1)
        c = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if p.requires_grad}
        hook = {"fedprox": FedProx(mu=5.0), "scaffold": Scaffold(c, {n: 0.5 * t for n, t in c.items()})}.get(control)

        def wrap(m, o, loader, acc=acc):  # type: ignore[no-untyped-def]
            loss = get_task("seq_cls").per_example_loss
            return make_private(
                model=m, optimizer=o, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, accountant=acc,
                loss_fn=loss, noise_seed=3, sampling_seed=4,
            )  # fmt: skip

        res = local_train(
            model, data, steps=3, batch_size=8, lr=1e-2, weight_decay=0.0, pad_id=0, seed=1, wrap=wrap, drift=hook
        )
        assert res.steps == 3 and (hook is None or hook.steps == 3)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if n in c})
        charged.append((acc.steps, acc.opacus.history, acc.epsilon(1e-5)))
    assert charged[0] == charged[1] == charged[2] and charged[0][2] > 0
    for other in trained[1:]:
        assert any(not torch.equal(trained[0][n], other[n]) for n in trained[0])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["drift=fedprox", "drift.mu=-1"], r"drift\.mu=-1\.0 is invalid"),
        (["drift.name=scafold"], r"drift\.name='scafold' is invalid: use one of none, fedprox, scaffold"),
        (["drift=fedprox", "drift.muu=1"], r"muu"),
        (["drift=scaffold", "strategy=fedsa_lora"], r"drift=scaffold does not compose with strategy=fedsa_lora"),
        (
            ["drift=scaffold", "strategy=flexlora", "sim.client_ranks=[2,4]"],
            r"drift=scaffold does not compose with strategy=flexlora: the server re-forms",
        ),
        (["drift=scaffold", "strategy.defence=median"], r"strategy=ffa_lora: with strategy\.defence=median"),
        (["drift=scaffold", "privacy=client"], r"drift=scaffold does not compose with client-level DP"),
    ],
)
def test_bad_drift_values_and_refused_pairings_fail_at_compose_naming_the_keys(
    tiny: list[str], overrides: list[str], match: str
) -> None:
    with pytest.raises(Exception, match=match):
        compose([*tiny, *overrides])


def _job(tiny: list[str], run_dir: Path, *extra: str) -> list[str]:
    job = [*tiny, "strategy=fedit", "strategy.rank=2", f"sim.num_clients={NODES}", "sim.rounds=2"]
    return [*job, "drift=scaffold", "server_opt=adam", f"run_dir={run_dir}", "data.partitioner=iid", *extra]


def test_a_resumed_scaffold_run_with_adam_ends_where_the_uninterrupted_one_ends(
    tiny: list[str], tmp_path: Path
) -> None:
    from fl.app.cli import resume_overrides

    run_server(LoopGrid(NODES), _job(tiny, tmp_path / "full"))
    run_server(LoopGrid(NODES), _job(tiny, tmp_path / "first", "sim.rounds=1"))
    (tmp_path / "first").rename(tmp_path / "part")  # a moved run folder resumes where it now is
    saved = Checkpoint.load(tmp_path / "part").strategy_state["scaffold"]
    assert set(saved["clients"]) == {0, 1, 2} and any(bool(t.abs().sum() > 0) for t in saved["c"].values())
    run_server(LoopGrid(NODES), resume_overrides(str(tmp_path / "part"), ["sim.rounds=2"]))  # fresh client contexts
    assert not (tmp_path / "first").exists()
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["round"] for r in resumed] == [0, 1, 2]
    for a, b in zip(full, resumed, strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    end_full, end_part = Checkpoint.load(tmp_path / "full"), Checkpoint.load(tmp_path / "part")
    for key, value in end_full.arrays.items():
        torch.testing.assert_close(value, end_part.arrays[key], rtol=1e-5, atol=1e-6)
    for key, value in end_full.strategy_state["scaffold"]["c"].items():
        torch.testing.assert_close(value, end_part.strategy_state["scaffold"]["c"][key], rtol=1e-5, atol=1e-6)
    # c goes down with every message and Δc_i comes up with every reply: same names and shapes as the arrays
    per_message = to_record(end_full.arrays).count_bytes()
    for row in full[1:]:
        assert row["bytes_down"] == row["bytes_up"] == 2 * NODES * per_message
        assert row["floats_down"] == row["floats_up"] == 2 * NODES * sum(t.numel() for t in end_full.arrays.values())
        assert row[K.SCAFFOLD_C_NORM] > 0
