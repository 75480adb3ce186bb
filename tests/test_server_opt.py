"""Server optimizers (`server_opt=`, `strategies.server_opt`): each rule step for step against Flower's own strategy,
the config errors, every method with a server optimizer on the tiny model (the real ServerApp and ClientApp
in-process through `LoopGrid`), exactness of FFA-LoRA and Fed-SB under it, and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAdagrad as FlowerAdagrad
from flwr.serverapp.strategy import FedAdam as FlowerAdam
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy import FedAvgM as FlowerAvgM
from flwr.serverapp.strategy import FedYogi as FlowerYogi
from loop_grid import LoopGrid

from fl.app.config import compose
from fl.app.server_app import run_server
from fl.checkpoint import Checkpoint
from fl.outputs import read_metrics
from strategies import get_strategy, names
from strategies.server_opt import SERVER_OPTIMIZERS, ServerOptimizer, make_server_optimizer

NODES = 3
KW = {"lr": 0.05, "momentum": 0.8, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


def _flower(name: str) -> Any:
    """Flower's strategy with the same hyper-parameters."""
    if name == "avgm":
        return FlowerAvgM(server_learning_rate=KW["lr"], server_momentum=KW["momentum"])
    if name == "adagrad":  # Flower's FedAdagrad has no first moment (β1 = 0, as configs/server_opt/adagrad.yaml)
        return FlowerAdagrad(eta=KW["lr"], tau=KW["tau"])
    cls = {"adam": FlowerAdam, "yogi": FlowerYogi}[name]
    return cls(eta=KW["lr"], beta_1=KW["beta_1"], beta_2=KW["beta_2"], tau=KW["tau"])


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi", "adagrad"])
def test_each_rule_takes_flowers_step(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four rounds of random aggregates: our step equals Flower's strategy fed the same aggregate."""
    gen = torch.Generator().manual_seed(3)
    x = {"a": torch.randn(4, 3, generator=gen), "b": torch.randn(5, generator=gen)}
    ours = SERVER_OPTIMIZERS[name](**{**KW, "beta_1": 0.0} if name == "adagrad" else KW)
    theirs = _flower(name)
    agg: dict[str, torch.Tensor] = {}
    # Flower's FedAvg step is replaced by "the aggregate is `agg`": what remains is its server optimizer alone
    monkeypatch.setattr(
        FedAvg,
        "aggregate_train",
        lambda self, rnd, replies: (ArrayRecord({k: Array(v.numpy()) for k, v in agg.items()}), MetricRecord()),
    )
    if name == "avgm":
        theirs.current_arrays = ArrayRecord({k: Array(v.numpy()) for k, v in x.items()})
    for rnd in range(1, 5):
        agg = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in x.items()}
        if name != "avgm":
            theirs.current_arrays = {k: v.numpy() for k, v in x.items()}  # what its configure_train stores
        record, _ = theirs.aggregate_train(rnd, [])
        x = ours.step(rnd, x, agg)
        for key, value in x.items():
            np.testing.assert_allclose(value.numpy(), record[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_none_returns_the_aggregate_and_moments_survive_a_state_round_trip() -> None:
    x, agg = {"w": torch.zeros(3)}, {"w": torch.tensor([1.0, -2.0, 0.5])}
    assert torch.equal(ServerOptimizer().step(1, x, agg)["w"], agg["w"])
    adam = SERVER_OPTIMIZERS["adam"](**KW)
    adam.step(1, x, agg)
    again = SERVER_OPTIMIZERS["adam"](**KW)
    again.load_state_dict(adam.state_dict())
    torch.testing.assert_close(again.step(2, x, agg)["w"], adam.step(2, x, agg)["w"])
    with pytest.raises(ValueError, match="server optimizer is 'adam' but server_opt=yogi"):
        SERVER_OPTIMIZERS["yogi"]().load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="has no current global tensor of that shape"):
        adam.step(3, {"w": torch.zeros(2)}, agg)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("server_opt.lr=0", r"server_opt\.lr=0\.0 is invalid"),
        ("server_opt.momentum=1.5", r"server_opt\.momentum=1\.5 is invalid"),
        ("server_opt.tau=-1", r"server_opt\.tau=-1\.0 is invalid"),
        ("server_opt.beta_2=1", r"server_opt\.beta_2=1\.0 is invalid"),
        ("server_opt.name=adamw", r"server_opt\.name='adamw' is invalid: use one of none, avgm, adam"),
        ("server_opt.lrr=1", r"server_opt\.lrr"),
    ],
)
def test_bad_values_fail_at_compose_naming_the_key(tiny: list[str], override: str, match: str) -> None:
    with pytest.raises(Exception, match=match):
        compose([*tiny, "server_opt=adam", override])


def test_every_registered_optimizer_is_a_config_option(tiny: list[str]) -> None:
    for name in SERVER_OPTIMIZERS:
        assert type(make_server_optimizer(compose([*tiny, f"server_opt={name}"]))).name == name


def _job(tiny: list[str], strategy: str, opt: str, run_dir: Path, *extra: str) -> list[str]:
    job = [*tiny, f"strategy={strategy}", "strategy.rank=2", f"sim.num_clients={NODES}", "sim.rounds=2"]
    job += [f"server_opt={opt}", f"run_dir={run_dir}", "data.partitioner=iid"]
    if strategy == "fed_sb":
        job.append("strategy.init=random")
    if get_strategy(strategy).mixed_ranks:
        job += ["sim.client_ranks=[1,2]"]
    return [*job, *extra]


OPTIMIZERS = [n for n in SERVER_OPTIMIZERS if n != "none"]


@pytest.mark.parametrize("strategy", names())
def test_every_method_runs_with_a_server_optimizer_or_is_refused(
    tiny: list[str], tmp_path: Path, strategy: str
) -> None:
    """One round of each method, the optimizers taken in turn over the methods (every rule's maths is checked
    against Flower's above; this checks the wiring, which is the same for every rule); every optimizer is refused
    by a method that cannot take one."""
    cls = get_strategy(strategy)
    if cls.server_opt_problem is not None:
        for opt in OPTIMIZERS:
            with pytest.raises(ValueError, match=f"server_opt={opt} does not compose with strategy={strategy}"):
                compose(_job(tiny, strategy, opt, tmp_path, "sim.rounds=1"))
        return
    opt = OPTIMIZERS[names().index(strategy) % len(OPTIMIZERS)]
    rows = read_metrics(run_server(LoopGrid(NODES), _job(tiny, strategy, opt, tmp_path, "sim.rounds=1")))
    assert rows[-1]["round"] == 1 and rows[-1]["aggregated"] == NODES, opt
    assert np.isfinite(rows[-1]["loss"]) and rows[-1]["server_step_ratio"] > 0, opt


@pytest.mark.parametrize("strategy", ["ffa_lora", "fed_sb"])
def test_exact_methods_stay_exact_and_the_global_product_is_one_adapters(
    tiny: list[str], tmp_path: Path, strategy: str
) -> None:
    """Under FedAdam the step acts on B̄ (R̄): the residual stays ~0, the global model is W0 + s·B_new·A (A frozen),
    and the step really differs from FedAvg's (the ratio is not 1)."""
    rows = read_metrics(run_server(LoopGrid(NODES), _job(tiny, strategy, "adam", tmp_path)))
    for row in rows[1:]:
        assert row["residual"] < 1e-6
        assert abs(row["server_step_ratio"] - 1.0) > 1e-3
    ckpt = Checkpoint.load(tmp_path)
    fixed = ckpt.strategy_state["fixed"]
    assert all(k not in ckpt.arrays for k in fixed)  # the frozen factors never move: one adapter's product
    assert set(ckpt.strategy_state["server_opt"]["m"]) == set(ckpt.arrays)  # moments for exactly what is averaged


def test_a_resumed_run_with_adam_ends_where_the_uninterrupted_one_ends(tiny: list[str], tmp_path: Path) -> None:
    from fl.app.cli import resume_overrides

    job = _job(tiny, "fedit", "adam", tmp_path / "full")
    run_server(LoopGrid(NODES), job)
    run_server(LoopGrid(NODES), _job(tiny, "fedit", "adam", tmp_path / "part", "sim.rounds=1"))
    assert Checkpoint.load(tmp_path / "part").strategy_state["server_opt"]["v"]  # the moments are saved
    run_server(LoopGrid(NODES), resume_overrides(str(tmp_path / "part"), ["sim.rounds=2"]))
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["round"] for r in resumed] == [0, 1, 2]
    for a, b in zip(full, resumed, strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    end_full, end_part = Checkpoint.load(tmp_path / "full").arrays, Checkpoint.load(tmp_path / "part").arrays
    for key, value in end_full.items():
        torch.testing.assert_close(value, end_part[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["flexlora", "fedsa_lora"])
def test_a_unit_step_without_momentum_is_fedavg_in_every_view(tiny: list[str], tmp_path: Path, strategy: str) -> None:
    """FedAvgM with η = 1 and μ = 0 gives x + Δ = the aggregate: the same run as no server optimizer, through the
    methods whose view is not their arrays (FlexLoRA's ΔW, FedSA-LoRA's Ā and head without B)."""
    plain = read_metrics(run_server(LoopGrid(NODES), _job(tiny, strategy, "none", tmp_path / "none")))
    unit = _job(tiny, strategy, "avgm", tmp_path / "unit", "server_opt.lr=1.0", "server_opt.momentum=0.0")
    stepped = read_metrics(run_server(LoopGrid(NODES), unit))
    for a, b in zip(plain, stepped, strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert stepped[-1]["server_step_ratio"] == pytest.approx(1.0, rel=1e-5)
