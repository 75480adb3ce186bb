"""Privacy: golden ε, accountant persistence, planning, per-example clipping, DP runs that stop cleanly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from loop_grid import LoopGrid
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from clients.train import local_train
from fl.adapters import build_adapter, trainable_state
from fl.app.config import compose
from fl.app.server_app import run_server
from fl.data import IndexedDataset, TokenizedSplit
from fl.outputs import read_metrics
from fl.tasks import get_task, load_base_model
from privacy import (
    ClientAccountant,
    default_delta,
    make_private,
    noisy_gradient_sum,
    plan_dp,
    release,
    sample_rate,
)

SEQ_CLS = get_task("seq_cls")  # the tiny models here are sequence classifiers


@pytest.mark.parametrize(("kind", "cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_an_independent_opacus_accountant(kind: str, cls: type) -> None:
    ours, ref = ClientAccountant(kind), cls()
    for sigma, q, n in [(1.1, 0.01, 50), (1.1, 0.01, 30), (0.9, 0.02, 10)]:
        ours.step(noise_multiplier=sigma, sample_rate=q, steps=n)
        for _ in range(n):
            ref.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.steps == 90
    assert ours.epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)


def test_saving_and_restoring_between_rounds_ends_at_the_same_epsilon() -> None:
    uninterrupted = ClientAccountant("rdp")
    carried = ClientAccountant("rdp")
    for rnd in range(3):
        uninterrupted.step(noise_multiplier=1.0, sample_rate=0.02, steps=20 + rnd)
        carried = ClientAccountant.from_config_record(carried.to_config_record())  # a new process each round
        carried.step(noise_multiplier=1.0, sample_rate=0.02, steps=20 + rnd)
    assert carried.epsilon(1e-5) == uninterrupted.epsilon(1e-5)
    assert carried.epsilon(1e-5) > ClientAccountant.from_config_record(
        ClientAccountant("rdp").to_config_record()
    ).epsilon(1e-5)


def test_a_state_of_another_kind_is_refused() -> None:
    rdp = ClientAccountant("rdp")
    rdp.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="rdp"):
        ClientAccountant("prv").load_state_dict(rdp.state_dict())
    with pytest.raises(ValueError, match=r"privacy\.accountant"):
        ClientAccountant("gdp_typo")


@pytest.mark.parametrize("init_steps", [0, 1])
def test_plan_meets_the_budget_without_wasting_it(init_steps: int) -> None:
    plan = plan_dp(
        target_epsilon=3.0,
        delta=1e-5,
        num_examples=2000,
        batch_size=16,
        steps_per_round=20,
        planned_rounds=5,
        max_grad_norm=1.0,
        init_steps=init_steps,
    )
    assert plan.accountant == "prv" and plan.eps_error == 0.01  # the default since issue 41 (RDP before)
    acc = ClientAccountant(plan.accountant)
    if init_steps:
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=1.0)
    acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=100)
    assert 0.9 * 3.0 <= acc.epsilon(1e-5) <= 3.0 + 1e-6
    assert plan.sample_rate == pytest.approx(1 / math.ceil(2000 / 16))
    assert "σ=" in plan.describe()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_epsilon": 0.0}, "privacy.target_epsilon"),
        ({"delta": 1.5}, "privacy.delta"),
        ({"max_grad_norm": -1.0}, "privacy.max_grad_norm"),
    ],
)
def test_plan_rejects_bad_input_naming_the_field(kwargs: dict[str, float], field: str) -> None:
    args = dict(
        target_epsilon=3.0,
        delta=1e-5,
        num_examples=100,
        batch_size=8,
        steps_per_round=5,
        planned_rounds=2,
        max_grad_norm=1.0,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        plan_dp(**args)  # type: ignore[arg-type]


def test_would_exceed_flips_exactly_at_the_budget() -> None:
    acc = ClientAccountant("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.05, steps=40)
    eps_next = ClientAccountant.from_config_record(acc.to_config_record())
    eps_next.step(noise_multiplier=1.0, sample_rate=0.05, steps=10)
    target = eps_next.epsilon(1e-5)
    assert not acc.would_exceed(target_epsilon=target, delta=1e-5, noise_multiplier=1.0, sample_rate=0.05, steps=10)
    assert acc.would_exceed(target_epsilon=target, delta=1e-5, noise_multiplier=1.0, sample_rate=0.05, steps=11)
    assert default_delta(1000) < 1 / 1000


def _tiny_model_and_data(n: int = 64):  # type: ignore[no-untyped-def]
    cfg = compose(["model=tiny", "strategy.rank=4"])
    model = build_adapter(
        load_base_model(cfg.model, num_labels=3, seed=0),
        kind="lora",
        strategy_cfg=cfg.strategy,
        targets=["all-linear"],
        seed=0,
    )
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 300, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen) for _ in range(n)]
    labels = torch.randint(0, 3, (n,), generator=gen)
    return model, IndexedDataset(TokenizedSplit(ids, labels))


def test_dp_round_trains_and_charges_exactly_the_steps_taken() -> None:
    model, data = _tiny_model_and_data()
    acc = ClientAccountant("rdp")
    before = trainable_state(model)
    sigma = 1.0

    def wrap(m, o, loader):  # type: ignore[no-untyped-def]
        return make_private(
            model=m,
            optimizer=o,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            accountant=acc,
            noise_seed=0,
            loss_fn=SEQ_CLS.per_example_loss,
        )

    for _ in range(2):  # two rounds on the same module: hooks must not pile up
        res = local_train(model, data, steps=5, batch_size=8, lr=1e-2, weight_decay=0.0, pad_id=0, seed=1, wrap=wrap)
    after = trainable_state(model)
    b_keys = [k for k in before if "lora_B" in k]
    assert all(float(before[k].abs().sum()) == 0.0 for k in b_keys)
    assert any(float(after[k].abs().sum()) > 0.0 for k in b_keys)
    ref = RDPAccountant()
    for _ in range(acc.steps):
        ref.step(noise_multiplier=sigma, sample_rate=1 / math.ceil(64 / 8))
    assert 5 <= acc.steps <= 10 and res.steps <= 5
    assert acc.epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_per_example_clipping_bounds_every_example() -> None:
    model, data = _tiny_model_and_data()
    clip = 1e-3
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    from clients.train import make_loader

    loader = make_loader(data, batch_size=8, pad_id=0, seed=0)
    model.train()
    gsm, dp_opt, dp_loader, _ = make_private(
        model=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        accountant=ClientAccountant("rdp"),
        poisson_sampling=False,
        loss_fn=SEQ_CLS.per_example_loss,
    )
    batch = next(iter(dp_loader))
    gsm.train()
    gsm(**batch).loss.backward()
    params = [p for p in gsm.parameters() if p.requires_grad]
    per_example = torch.stack([p.grad_sample.reshape(len(batch["labels"]), -1).norm(dim=1) for p in params]).norm(dim=0)
    assert float(per_example.min()) > clip  # unclipped gradients are larger than C: clipping has work to do
    dp_opt.clip_and_accumulate()
    factors = (clip / (per_example + 1e-6)).clamp(max=1.0)
    assert torch.all(factors * per_example <= clip + 1e-9)
    summed = torch.cat([p.summed_grad.reshape(-1) for p in params]).norm()
    assert float(summed) <= len(batch["labels"]) * clip + 1e-7
    release(gsm)


def test_noisy_gradient_sum_is_the_plain_sum_without_clipping_or_noise() -> None:
    model, data = _tiny_model_and_data(12)
    from fl.tasks.classification import collate

    batches = [collate([data[i] for i in range(s, s + 4)], 0) for s in range(0, 12, 4)]
    params = {n: p for n, p in model.named_parameters() if n.endswith("query.base_layer.weight")}
    acc = ClientAccountant("rdp")
    model.eval()
    plain = noisy_gradient_sum(
        model=model,
        params=params,
        batches=batches,
        max_grad_norm=float("inf"),
        noise_multiplier=0.0,
        loss_fn=SEQ_CLS.loss_of,
    )
    for p in params.values():
        p.requires_grad_(True)
    total = sum(model(**b).loss * len(b["labels"]) for b in batches)
    ref = torch.autograd.grad(total, list(params.values()))
    for p in params.values():
        p.requires_grad_(False)
    for (name, g), r in zip(plain.items(), ref, strict=True):
        assert torch.allclose(g, r, atol=1e-5), name
    clipped = noisy_gradient_sum(
        model=model,
        params=params,
        batches=batches[:1],
        max_grad_norm=1e-3,
        noise_multiplier=1.0,
        generator=torch.Generator().manual_seed(0),
        accountant=acc,
        loss_fn=SEQ_CLS.loss_of,
    )
    assert clipped and acc.steps == 1 and acc.opacus.history[0][1] == 1.0


def test_dp_simulation_reports_true_epsilon_and_exhausted_clients_decline(tiny: list[str], tmp_path: Path) -> None:
    # In-process: DP-SGD in Ray actors runs in tests/test_causal_lm.py (FFA-LoRA + DP) and on SuperNodes in
    # tests/test_privacy_deploy.py; a Ray run here cost ~40 s of the suite's CPU for the same ServerApp/ClientApp.
    run_dir = run_server(
        LoopGrid(2),
        [
            *tiny,
            "privacy=dp",
            "privacy.target_epsilon=8",
            "privacy.planned_rounds=1",
            "sim.rounds=2",
            "sim.num_clients=2",
            "data.partitioner=iid",
            f"run_dir={tmp_path / 'r'}",
        ],
    )
    rows = read_metrics(run_dir)
    assert 0 < rows[1]["epsilon_max"] <= 8.0
    assert rows[1]["aggregated"] == 2 and rows[1]["train_loss"] is None  # DP clients keep their loss to themselves
    # round 2 would exceed the budget planned for 1 round: both clients decline, the run still finishes
    assert rows[2]["declined"] == 2 and rows[2]["skipped"]
    assert (run_dir / "privacy_plan.json").is_file()
    import json

    plans = json.loads((run_dir / "privacy_plan.json").read_text())
    assert all(p["accountant"] == "prv" and p["eps_error"] == 0.01 for p in plans)
    eps_ref = max(_eps(p["noise_multiplier"], p["sample_rate"], p["steps_per_round"], p["delta"]) for p in plans)
    assert rows[1]["epsilon_max"] == pytest.approx(eps_ref, rel=1e-6)


def _eps(sigma: float, q: float, steps: int, delta: float) -> float:
    """An independent Opacus PRV accountant stepped one step at a time (the default accountant since issue 41)."""
    acc = PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε from Opacus' RDP analysis functions alone (no accountant object, no code of ours)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def _prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε from an Opacus PRV accountant given the history (no code of ours)."""
    with np.errstate(divide="ignore"):  # q = 1: Opacus takes log(1 - q) = log 0 on purpose
        acc = PRVAccountant()
        acc.history = history
        return float(acc.get_epsilon(delta=delta))


def test_each_clients_epsilon_is_recomputed_from_privacy_plan_json(tiny: list[str], tmp_path: Path) -> None:
    """Fed-SB's private init (its own σ from privacy.init_share) + DP-SGD at a logical batch of 16 made of physical
    batches of 8: the ε each client reports after the init and after a round equals an independent recomputation
    (Opacus' PRV accountant: the default) from what privacy_plan.json says (σ_init, σ, q, steps)."""
    run_dir = run_server(  # in-process, as the DP simulation above
        LoopGrid(2),
        [
            *tiny,
            "strategy=fed_sb",
            "strategy.rank=4",
            "privacy=dp",
            "privacy.target_epsilon=8",
            "privacy.init_share=0.2",
            "privacy.batch_size=16",
            "sim.rounds=1",
            "sim.num_clients=2",
            "data.partitioner=iid",
            f"run_dir={tmp_path / 'r'}",
        ],
    )
    rows = read_metrics(run_dir)
    import json

    plans = json.loads((run_dir / "privacy_plan.json").read_text())
    assert all(p["init_steps"] == 1 and p["init_noise_multiplier"] > p["noise_multiplier"] for p in plans)
    assert all(p["batch_size"] == 16 and p["sample_rate"] == sample_rate(p["num_examples"], 16) for p in plans)
    init = [_prv_epsilon([(p["init_noise_multiplier"], 1.0, 1)], p["delta"]) for p in plans]
    after = [
        _prv_epsilon([(p["init_noise_multiplier"], 1.0, 1), (p["noise_multiplier"], p["sample_rate"], 2)], p["delta"])
        for p in plans
    ]
    rdp_after = [
        _rdp_epsilon([(p["init_noise_multiplier"], 1.0, 1), (p["noise_multiplier"], p["sample_rate"], 2)], p["delta"])
        for p in plans
    ]
    assert all(a < r for a, r in zip(after, rdp_after, strict=True))  # PRV, the plan's accountant, is the tighter
    assert max(init) <= 0.2 * 8  # the init's share
    for row, ref in ((rows[0], init), (rows[1], after)):  # two clients: max and mean pin both values
        assert row["epsilon_max"] == pytest.approx(max(ref), rel=1e-6)
        assert row["epsilon_mean"] == pytest.approx(sum(ref) / len(ref), rel=1e-6)
    assert max(init) < rows[1]["epsilon_max"] <= 8.0 + 1e-6
