"""`train.optimizer` and `train.keep_optimizer_state`: the registry, the state's round trip through a Flower
ArrayRecord, state that does not fit, and a client that keeps its optimiser state across real rounds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord
from loop_grid import LoopGrid

from clients.optim import OPTIMIZERS, load_state_tensors, make_optimizer, state_tensors
from fl import constants as K
from fl.adapters import fixed_state, trainable_state
from fl.app.config import compose
from fl.app.workspace import get_workspace
from fl.wire import to_record
from strategies import get_strategy


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step in grads:
        opt.zero_grad()
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_kept_state_continues_the_optimiser_as_if_it_had_never_stopped(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(4, 3, generator=g), torch.randn(3, generator=g)] for _ in range(6)]
    one = _params()
    _steps(make_optimizer(name, one, lr=0.05, momentum=0.9), one, grads)  # six steps, one optimiser

    two = _params()
    first = make_optimizer(name, two, lr=0.05, momentum=0.9)
    _steps(first, two, grads[:3])
    saved = ArrayRecord(torch_state_dict=state_tensors(first)).to_torch_state_dict()  # through Flower's record
    second = make_optimizer(name, two, lr=0.05, momentum=0.9)  # next round: a new optimiser
    assert load_state_tensors(second, saved)
    _steps(second, two, grads[3:])
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b)

    fresh = _params()  # and a fresh optimiser in round two moves the parameters elsewhere
    f1 = make_optimizer(name, fresh, lr=0.05, momentum=0.9)
    _steps(f1, fresh, grads[:3])
    _steps(make_optimizer(name, fresh, lr=0.05, momentum=0.9), fresh, grads[3:])
    assert not torch.allclose(fresh[0], one[0])


def test_state_that_does_not_fit_leaves_the_optimiser_fresh() -> None:
    params = _params()
    adam = make_optimizer("adamw", params, lr=0.1)
    _steps(adam, params, [[torch.ones(4, 3), torch.ones(3)]])
    saved = state_tensors(adam)
    assert {k.split(".", 1)[1] for k in saved} == {"step", "exp_avg", "exp_avg_sq"}

    other_shape = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(3))]
    assert not load_state_tensors(make_optimizer("adamw", other_shape, lr=0.1), saved)
    fewer = [torch.nn.Parameter(torch.zeros(4, 3))]
    target = make_optimizer("adamw", fewer, lr=0.1)
    assert not load_state_tensors(target, saved)
    assert target.state_dict()["state"] == {}
    sgd = make_optimizer("sgd", _params(), lr=0.1, momentum=0.9)
    assert not load_state_tensors(sgd, saved)  # AdamW's moments are not a momentum buffer
    assert sgd.state_dict()["state"] == {}
    poisoned = {k: v.clone() for k, v in saved.items()}
    poisoned["0.exp_avg_sq"][0, 0] = float("nan")
    fresh = make_optimizer("adamw", _params(), lr=0.1)
    assert not load_state_tensors(fresh, poisoned)  # a diverged round's state is not carried on
    assert fresh.state_dict()["state"] == {}


def test_an_unknown_optimizer_or_momentum_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"train\.optimizer='adam' is unknown; use one of adamw, sgd"):
        make_optimizer("adam", _params(), lr=0.1)
    with pytest.raises(ValueError, match=r"train\.optimizer='adam' is invalid"):
        compose(["train.optimizer=adam"])
    with pytest.raises(ValueError, match=r"train\.momentum.*\[0, 1\)"):
        compose(["train.optimizer=sgd", "train.momentum=1.5"])


def _rounds(overrides: list[str], rounds: int = 2) -> LoopGrid:
    cfg = compose(overrides)
    ws = get_workspace(overrides)
    strategy = get_strategy(cfg.strategy.name).from_config(cfg, overrides=overrides, fixed=fixed_state(ws.model))
    grid = LoopGrid(2)
    strategy.start(grid, to_record(trainable_state(ws.model)), num_rounds=rounds, evaluate_fn=lambda *a: None)
    return grid


def _kept(grid: LoopGrid) -> list[dict[str, Any]]:
    return [
        dict(c.state.array_records[K.STATE_OPTIMIZER].to_torch_state_dict())
        for c in grid.contexts.values()
        if K.STATE_OPTIMIZER in c.state.array_records
    ]


@pytest.mark.parametrize("dp", [False, True])
def test_a_client_keeps_its_optimiser_state_across_rounds_only_when_asked(tiny: list[str], dp: bool) -> None:
    job = [*tiny, "strategy=ffa_lora", "strategy.rank=2", "sim.num_clients=2", "data.partitioner=iid"]
    job += ["train.local_steps=3", "sim.rounds=2"]
    if dp:  # under DP-SGD the Opacus optimizer wraps the AdamW whose state is kept
        job += ["privacy=dp", "privacy.local_steps=3"]
    assert _kept(_rounds(job)) == []  # the default: a new optimiser every round, nothing kept

    kept = _kept(_rounds([*job, "train.keep_optimizer_state=true"]))
    assert len(kept) == 2  # each node kept its own
    for state in kept:
        steps = {float(v) for k, v in state.items() if k.endswith(".step")}
        assert steps == {6.0}  # 3 steps in round 1 carried into round 2's 3 steps
        assert all(torch.isfinite(v).all() for v in state.values())
    assert not torch.equal(kept[0]["0.exp_avg"], kept[1]["0.exp_avg"])  # per client, from its own data
