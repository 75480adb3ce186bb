"""The privacy package on its own: golden ε, accountant persistence, planning, DP-SGD wiring, init gradient.

Models are a tiny random BERT (hidden 32, 2 layers) with LoRA r=4 on query/value; no network, no data files.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from fl.app.config import compose
from fl.config_privacy import CLIPPINGS as CONFIG_CLIPPINGS
from fl.tasks import get_task
from privacy import (
    CLIPPINGS,
    ClientAccountant,
    default_delta,
    epsilon_after,
    make_private,
    noisy_gradient_sum,
    per_layer_bounds,
    plan_dp,
    release,
    sample_rate,
    unwrap,
)

SEQ_CLS = get_task("seq_cls")  # the tiny models here are sequence classifiers

DELTA = 1e-5
SEGMENTS = [(1.1, 0.01, 50), (1.1, 0.01, 30), (0.9, 0.02, 10), (2.0, 1.0, 1)]  # (σ, q, steps), incl. a q=1 step


# ----------------------------------------------------------------------------- accountant


@pytest.mark.parametrize(("kind", "cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_an_independent_opacus_accountant(kind: str, cls: type) -> None:
    ours, ref = ClientAccountant(kind), cls()
    assert ours.epsilon(DELTA) == 0.0
    for sigma, q, n in SEGMENTS:
        ours.step(noise_multiplier=sigma, sample_rate=q, steps=n)
        for _ in range(n):
            ref.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.steps == 91
    assert ours.opacus.history == ref.history
    assert ours.epsilon(DELTA) == ref.get_epsilon(delta=DELTA)
    assert 0 < ours.epsilon(DELTA) < math.inf


def test_rdp_epsilon_equals_the_rdp_maths() -> None:
    acc = ClientAccountant("rdp")
    for sigma, q, n in SEGMENTS:
        acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in SEGMENTS)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert acc.epsilon(DELTA) == pytest.approx(float(eps), rel=1e-12)


def test_full_batch_step_is_the_plain_gaussian_mechanism() -> None:
    """At q = 1 the RDP of T Gaussian steps is T·α/(2σ²) (Mironov 2017); converted as in Balle et al. 2020."""
    sigma, steps = 1.5, 3
    acc = ClientAccountant("rdp")
    acc.step(noise_multiplier=sigma, sample_rate=1.0, steps=steps)
    a = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    eps = steps * a / (2 * sigma**2) - (np.log(DELTA) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    assert acc.epsilon(DELTA) == pytest.approx(float(eps.min()), rel=1e-12)


def test_no_noise_means_no_privacy() -> None:
    acc = ClientAccountant("rdp")
    acc.step(noise_multiplier=0.0, sample_rate=0.1)
    assert acc.epsilon(DELTA) == math.inf


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_saving_and_restoring_between_rounds_ends_at_the_same_epsilon(kind: str) -> None:
    """Three rounds, each in a 'new process' that only has the Flower Context.state, vs one accountant."""
    uninterrupted = ClientAccountant(kind)
    state = RecordDict()
    state["privacy"] = ClientAccountant(kind).to_config_record()
    per_round = []  # what a fresh accountant per round (Flower's Opacus example) would report
    for rnd in range(3):
        steps = 20 + rnd
        uninterrupted.step(noise_multiplier=1.0, sample_rate=0.02, steps=steps)
        carried = ClientAccountant.from_config_record(state.config_records["privacy"])
        carried.step(noise_multiplier=1.0, sample_rate=0.02, steps=steps)
        state["privacy"] = carried.to_config_record()
        fresh = ClientAccountant(kind)
        fresh.step(noise_multiplier=1.0, sample_rate=0.02, steps=steps)
        per_round.append(fresh.epsilon(DELTA))
    resumed = ClientAccountant.from_config_record(state.config_records["privacy"])
    assert resumed.steps == uninterrupted.steps == 63
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.epsilon(DELTA) == uninterrupted.epsilon(DELTA)
    assert resumed.epsilon(DELTA) > 1.1 * max(per_round)  # a fresh accountant per round under-reports ε


def test_a_state_of_another_kind_or_a_corrupt_one_is_refused() -> None:
    rdp = ClientAccountant("rdp")
    rdp.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="'rdp' accountant state into a 'prv'"):
        ClientAccountant("prv").load_state_dict(rdp.state_dict())
    with pytest.raises(ValueError, match=r"privacy\.accountant='gdp_typo' is unknown.*\['prv', 'rdp'\]"):
        ClientAccountant("gdp_typo")
    bad = {**rdp.state_dict(), "steps": [1, 2]}
    with pytest.raises(ValueError, match="different lengths"):
        ClientAccountant("rdp").load_state_dict(bad)
    prv_record = ClientAccountant("prv").to_config_record()
    assert ClientAccountant.from_config_record(prv_record).kind == "prv"  # the tag picks the kind
    with pytest.raises(ValueError, match="'prv' accountant state into a 'rdp'"):
        ClientAccountant("rdp").load_state_dict(dict(prv_record.items()))
    with pytest.raises(ValueError, match="missing"):
        ClientAccountant("rdp").load_state_dict(ConfigRecord({"kind": "rdp"}))


def test_would_exceed_flips_exactly_at_the_budget() -> None:
    acc = ClientAccountant("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.05, steps=40)
    target = epsilon_after(1.0, sample_rate=0.05, steps=50, delta=DELTA, accountant="rdp")  # 10 more steps
    kw = {"target_epsilon": target, "delta": DELTA, "noise_multiplier": 1.0, "sample_rate": 0.05}
    assert not acc.would_exceed(**kw, steps=10)
    assert acc.would_exceed(**kw, steps=11)
    assert acc.steps == 40  # asked on a copy


# ----------------------------------------------------------------------------- planning


@pytest.mark.parametrize(("accountant", "extra"), [("rdp", 0), ("rdp", 1), ("prv", 1)])
def test_plan_meets_the_budget_without_wasting_it(accountant: str, extra: int) -> None:
    kw = {"num_examples": 1000, "batch_size": 16, "steps_per_round": 20, "planned_rounds": 5}
    plan = plan_dp(
        target_epsilon=3.0, delta=DELTA, max_grad_norm=1.0, accountant=accountant, extra_full_batch_steps=extra, **kw
    )
    ref = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(extra):
        ref.step(noise_multiplier=plan.noise_multiplier, sample_rate=1.0)
    for _ in range(100):
        ref.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert 0.9 * 3.0 <= ref.get_epsilon(delta=DELTA) <= 3.0
    # q is what Opacus charges: 1 / len(loader) for this batch size
    assert plan.sample_rate == 1 / len(DataLoader(range(1000), batch_size=16)) == 1 / 63
    assert plan.extra_full_batch_steps == extra
    assert f"σ={plan.noise_multiplier:.4g}" in plan.describe() and "ε=3" in plan.describe()
    if extra:  # the init step must cost budget: more noise than without it
        without = plan_dp(target_epsilon=3.0, delta=DELTA, max_grad_norm=1.0, accountant=accountant, **kw)
        assert plan.noise_multiplier > without.noise_multiplier


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε of a (σ, q, steps) history straight from Opacus' RDP analysis functions (no accountant object)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


@pytest.mark.parametrize(("share", "init_steps"), [(0.1, 1), (0.3, 1), (0.1, 2)])
def test_init_share_gives_the_init_its_own_sigma_composed_within_the_budget(share: float, init_steps: int) -> None:
    kw = {"num_examples": 1000, "batch_size": 64, "steps_per_round": 20, "planned_rounds": 5, "max_grad_norm": 1.0}
    kw["accountant"] = "rdp"  # checked with RDP's maths alone; PRV's init share: tests/test_privacy_prv.py
    plan = plan_dp(target_epsilon=3.0, delta=DELTA, extra_full_batch_steps=init_steps, init_share=share, **kw)
    assert plan.init_steps == init_steps and plan.init_noise_multiplier is not None and plan.init_share == share
    init_only = _rdp_epsilon([(plan.init_noise_multiplier, 1.0, init_steps)], DELTA)
    assert share * 3.0 - 0.011 <= init_only <= share * 3.0  # the init costs its share alone
    assert 3.0 - 0.011 <= _rdp_epsilon(plan.history(), DELTA) <= 3.0  # composed: the whole budget, not more
    assert f"σ_init={plan.init_noise_multiplier:.4g}" in plan.describe()
    shared = plan_dp(target_epsilon=3.0, delta=DELTA, extra_full_batch_steps=init_steps, **kw)
    assert shared.init_noise_multiplier == shared.noise_multiplier > plan.noise_multiplier  # training gets less noise


def test_sample_rate_is_capped_at_one() -> None:
    assert sample_rate(10, 32) == 1.0
    assert sample_rate(100, 30) == 1 / 4


def test_sample_rate_is_what_opacus_charges_even_where_its_loader_rounds_down() -> None:
    """Found in a DP sweep: a client with 1,477 examples (93 batches of 16) was charged 1/92 per step by
    Opacus (its Poisson loader has int(1 / (1/93)) = 92 batches), ran out of budget one round early and
    declined its last planned round. The plan must use the charged rate."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    assert sample_rate(1477, 16) == 1 / 92
    for n in [*range(1, 400), 1477, 2000, 4999, 10_000]:
        for batch in (1, 8, 16, 32):
            loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch))
            assert sample_rate(n, batch) == 1 / len(loader), (n, batch)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_epsilon": 0.0}, r"privacy\.target_epsilon must be > 0, got 0\.0\. Set privacy\.target_epsilon=3"),
        ({"delta": 1.5}, r"privacy\.delta must be in \(0, 1\), got 1\.5"),
        ({"delta": 0.0}, r"privacy\.delta"),
        ({"num_examples": 0}, r"num_examples must be > 0, got 0"),
        ({"batch_size": 0}, r"train\.batch_size must be > 0, got 0"),
        ({"steps_per_round": 0}, r"steps_per_round must be > 0"),
        ({"planned_rounds": 0}, r"privacy\.planned_rounds must be > 0"),
        ({"max_grad_norm": -1.0}, r"privacy\.max_grad_norm must be > 0, got -1\.0"),
        ({"accountant": "gdp"}, r"privacy\.accountant must be one of \['prv', 'rdp'\], got 'gdp'"),
        ({"extra_full_batch_steps": -1}, r"extra_full_batch_steps must be >= 0, got -1"),
        (
            {"extra_full_batch_steps": 1, "init_share": 1.0},
            r"privacy\.init_share must be in \(0, 1\) or null, got 1\.0",
        ),
    ],
)
def test_plan_rejects_bad_input_naming_the_field(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "target_epsilon": 3.0,
        "delta": DELTA,
        "num_examples": 100,
        "batch_size": 8,
        "steps_per_round": 5,
        "planned_rounds": 2,
        "max_grad_norm": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plan_dp(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 7, 10, 999, 38158])
def test_default_delta_is_below_one_over_n(n: int) -> None:
    assert 0 < default_delta(n) < 1 / n


# ----------------------------------------------------------------------------- DP-SGD on a tiny PEFT BERT


def _tiny_lora_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        num_labels=3,
        hidden_dropout_prob=0.0,  # deterministic forward passes: per-example checks compare runs exactly
        attention_probs_dropout_prob=0.0,
    )
    base = BertForSequenceClassification(config).to("cpu")  # to the device BEFORE get_peft_model (opacus #820)
    lora = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], lora_dropout=0.0)
    return get_peft_model(base, lora)


def _examples(n: int, *, seq: int = 8, seed: int = 0, pad: bool = False) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 100, (seq,), generator=gen)
        mask = torch.ones(seq, dtype=torch.long)
        if pad and i % 2:
            ids[seq // 2 :], mask[seq // 2 :] = 0, 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (), generator=gen)})
    return out


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def _lora_b(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def _dp_round(model: torch.nn.Module, acc: ClientAccountant, *, seed: int) -> tuple[int, int]:
    """One epoch of DP-SGD; returns (optimizer steps taken, GradSampleModule hooks seen during the round)."""
    loader = DataLoader(_examples(32, seed=seed), batch_size=8, collate_fn=_collate)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    gsm, dp_opt, dp_loader, _ = make_private(
        model=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant=acc,
        noise_seed=seed,
        loss_fn=SEQ_CLS.per_example_loss,
    )
    assert isinstance(dp_opt, DPOptimizer) and isinstance(dp_loader, DPDataLoader) and unwrap(gsm) is model
    hooks, taken = _hook_count(model), 0
    for batch in dp_loader:
        if batch["labels"].numel() == 0:  # an empty Poisson batch: no step, no charge
            continue
        dp_opt.zero_grad(set_to_none=True)
        gsm(**batch).loss.backward()  # keyword inputs work in hooks mode
        dp_opt.step()
        taken += 1
    assert release(gsm) is model
    return taken, hooks


def test_dp_rounds_train_lora_and_charge_the_persistent_accountant_exactly() -> None:
    model = _tiny_lora_bert()
    acc = ClientAccountant("rdp")
    b0 = _lora_b(model)
    assert all(float(b.abs().sum()) == 0.0 for b in b0.values())  # LoRA B starts at zero
    hooks_before = _hook_count(model)

    taken1, hooks1 = _dp_round(model, acc, seed=1)
    b1 = _lora_b(model)
    assert taken1 > 0 and all(float(b.abs().sum()) > 0.0 for b in b1.values())
    ref = RDPAccountant()
    for _ in range(taken1):
        ref.step(noise_multiplier=1.0, sample_rate=1 / 4)
    assert acc.steps == taken1
    assert acc.epsilon(DELTA) == ref.get_epsilon(delta=DELTA)
    assert _hook_count(model) == hooks_before  # release took every hook off
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())

    acc = ClientAccountant.from_config_record(acc.to_config_record())  # next round, another process
    taken2, hooks2 = _dp_round(model, acc, seed=2)  # same module made private again
    assert hooks2 == hooks1 > hooks_before  # hooks do not stack across rounds
    assert any(not torch.equal(b1[n], b) for n, b in _lora_b(model).items())
    for _ in range(taken2):
        ref.step(noise_multiplier=1.0, sample_rate=1 / 4)
    assert acc.steps == taken1 + taken2
    assert acc.epsilon(DELTA) == ref.get_epsilon(delta=DELTA)


def test_make_private_refuses_a_module_still_wrapped_and_unsupported_modes() -> None:
    model = _tiny_lora_bert()
    loader = DataLoader(_examples(8), batch_size=4, collate_fn=_collate)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    kw = {
        "optimizer": opt,
        "data_loader": loader,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "loss_fn": SEQ_CLS.per_example_loss,
    }
    with pytest.raises(ValueError, match="grad_sample_mode='ew'"):
        make_private(model=model, accountant=ClientAccountant(), grad_sample_mode="ew", **kw)  # type: ignore[arg-type]
    model.train()
    gsm, _, _, _ = make_private(model=model, accountant=ClientAccountant(), **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="release"):
        make_private(model=model, accountant=ClientAccountant(), **kw)  # type: ignore[arg-type]
    release(gsm)


def _noise_free(
    examples: list[dict[str, torch.Tensor]], *, clip: float, clipping: str = "flat"
) -> tuple[Any, Any, list[torch.nn.Parameter]]:
    """A tiny LoRA BERT made private with σ = 0 over `examples` (fixed batches): (module, DP optimizer, params)."""
    model = _tiny_lora_bert()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model.train()
    gsm, dp_opt, _, _ = make_private(
        model=model,
        optimizer=opt,
        data_loader=DataLoader(examples, batch_size=len(examples), collate_fn=_collate),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        accountant=ClientAccountant(),
        poisson_sampling=False,
        clipping=clipping,
        loss_fn=SEQ_CLS.per_example_loss,
    )
    return gsm, dp_opt, [p for p in gsm.parameters() if p.requires_grad]


def test_opacus_clips_each_example_to_max_grad_norm() -> None:
    """What is checked: with σ = 0, the DP optimizer's clipped sum (`p.summed_grad`, filled by
    `clip_and_accumulate`) for a batch equals the sum of the clipped sums of its examples run one at a time,
    and each single example's clipped gradient has joint L2 norm ≤ C over all LoRA/classifier tensors (= C,
    since every unclipped gradient is larger): clipping is per example, not per batch."""
    clip = 1e-3
    examples = _examples(4, seed=3)
    gsm, dp_opt, params = _noise_free(examples, clip=clip)

    def clipped_sum(items: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        dp_opt.zero_grad(set_to_none=True)
        gsm(**_collate(items)).loss.backward()
        raw = torch.cat([p.grad_sample.reshape(len(items), -1) for p in params], dim=1).norm(dim=1)
        dp_opt.clip_and_accumulate()
        return torch.cat([p.summed_grad.reshape(-1) for p in params]), raw

    batch_sum, raw_norms = clipped_sum(examples)
    assert float(raw_norms.min()) > 10 * clip  # every example needs clipping
    singles = [clipped_sum([ex])[0] for ex in examples]
    for single in singles:
        assert float(single.norm()) <= clip + 1e-6
        assert float(single.norm()) == pytest.approx(clip, rel=1e-3)
    assert torch.allclose(batch_sum, torch.stack(singles).sum(dim=0), atol=1e-7, rtol=1e-4)
    assert float(batch_sum.norm()) <= len(examples) * clip + 1e-6
    release(gsm)


def test_per_layer_clipping_bounds_each_tensor_and_keeps_the_total_bound_and_noise() -> None:
    """`clipping="per_layer"` with σ = 0: each example's gradient of each trainable tensor is clipped to C/√P on
    its own (so the whole is ≤ C), a batch's sum is the sum of its examples', the DP optimizer's C (the noise
    scale σC) is the flat C, and it runs under bf16 autocast with fp32 gradients."""
    clip = 1e-3
    examples = _examples(4, seed=3)
    gsm, dp_opt, params = _noise_free(examples, clip=clip, clipping="per_layer")
    bound = clip / math.sqrt(len(params))
    assert dp_opt.max_grad_norm == pytest.approx(clip)  # the noise std is σ·C, as under flat clipping

    def clipped(items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        dp_opt.zero_grad(set_to_none=True)
        gsm(**_collate(items)).loss.backward()
        dp_opt.clip_and_accumulate()
        return [p.summed_grad.clone() for p in params]

    singles = [clipped([ex]) for ex in examples]
    for single in singles:
        norms = [float(g.norm()) for g in single]
        assert max(norms) <= bound + 1e-7
        # the tensors with large gradients (LoRA B, the head's weight) sit exactly at their own bound
        assert sum(n == pytest.approx(bound, rel=1e-2) for n in norms) >= 2, (norms, bound)  # Opacus: n + 1e-6
        assert math.sqrt(sum(n * n for n in norms)) <= clip + 1e-7
    for got, *parts in zip(clipped(examples), *singles, strict=True):
        torch.testing.assert_close(got, torch.stack(parts).sum(dim=0), atol=1e-8, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Opacus' own per-layer optimizer fails here
        got = clipped(examples)
    assert all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in got), [g.dtype for g in got]
    release(gsm)


def test_a_head_share_splits_c_squared_between_the_head_and_the_adapter() -> None:
    model = _tiny_lora_bert()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head = ["modules_to_save" in n for n in names]
    assert sum(head) == 2 and len(names) == 10  # classifier weight and bias; A and B of 2 layers x 2 modules
    equal = per_layer_bounds(model, opt, 0.1, head_share=None)
    assert equal == pytest.approx([0.1 / math.sqrt(10)] * 10)
    split = per_layer_bounds(model, opt, 0.1, head_share=0.5)
    assert sum(c * c for c in split) == pytest.approx(0.01)
    assert sum(c * c for c, h in zip(split, head, strict=True) if h) == pytest.approx(0.005)
    assert len({round(c, 12) for c, h in zip(split, head, strict=True) if not h}) == 1
    with pytest.raises(ValueError, match=r"privacy\.head_clip_share.*per_layer"):
        compose(["privacy=dp", "privacy.head_clip_share=0.5"])  # flat clipping has no share


def test_per_layer_clipping_is_refused_with_ghost_and_config_names_the_field() -> None:
    model = _tiny_lora_bert()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(_examples(8), batch_size=4, collate_fn=_collate)
    with pytest.raises(ValueError, match="per_layer with hooks or functorch"):
        make_private(
            model=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            accountant=ClientAccountant(),
            grad_sample_mode="ghost",
            clipping="per_layer",
            loss_fn=SEQ_CLS.per_example_loss,
        )
    assert CLIPPINGS == CONFIG_CLIPPINGS
    with pytest.raises(ValueError, match=r"privacy\.clipping='flt' is invalid: use one of flat, per_layer"):
        compose(["privacy=dp", "privacy.clipping=flt"])
    with pytest.raises(ValueError, match=r"privacy\.clipping='per_layer'.*grad_sample_mode=hooks"):
        compose(["privacy=dp", "privacy.clipping=per_layer", "privacy.grad_sample_mode=ghost"])


# ----------------------------------------------------------------------------- Fed-SB init gradient


def _base_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {
        n: p for n, p in model.named_parameters() if n.endswith(("query.base_layer.weight", "value.base_layer.weight"))
    }


def _plain_gradient_sum(
    model: torch.nn.Module, params: list[torch.nn.Parameter], batches: list[dict]
) -> list[torch.Tensor]:
    for p in params:
        p.requires_grad_(True)
    total = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total = total + torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum")
    grads = torch.autograd.grad(total, params)
    for p in params:
        p.requires_grad_(False)
    return list(grads)


def test_noisy_gradient_sum_is_the_plain_sum_without_clipping_or_noise() -> None:
    model = _tiny_lora_bert()
    model.eval()
    named = _base_weights(model)
    params = list(named.values())
    batches = [_collate(_examples(5, seed=s, pad=True)) for s in (4, 5)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with model.disable_adapter():
        ref = _plain_gradient_sum(model, params, batches)
        as_list = noisy_gradient_sum(
            model=model,
            params=params,
            batches=batches,
            max_grad_norm=math.inf,
            noise_multiplier=0.0,
            micro_batch_size=3,
            loss_fn=SEQ_CLS.loss_of,
        )
        as_dict = noisy_gradient_sum(
            model=model,
            params=named,
            batches=batches,
            max_grad_norm=math.inf,
            noise_multiplier=0.0,
            loss_fn=SEQ_CLS.loss_of,
        )
    assert isinstance(as_list, list) and list(as_dict) == list(named)
    for got, alt, want in zip(as_list, as_dict.values(), ref, strict=True):
        assert float(want.abs().max()) > 0
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
        assert torch.allclose(alt, want, atol=1e-6, rtol=1e-4)
    # the model is left as it was: flags, eval mode, no hooks or per-example state
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training and not any(m.training for m in model.modules())
    assert _hook_count(model) == 0 and not hasattr(model, "autograd_grad_sample_hooks")
    assert not any(hasattr(p, "grad_sample") or p.grad is not None for p in model.parameters())


def test_noisy_gradient_sum_bounds_each_example_and_charges_one_full_batch_step() -> None:
    model = _tiny_lora_bert()
    model.eval()
    params = list(_base_weights(model).values())
    examples = _examples(4, seed=6)
    clip = 1e-4
    kw = {"model": model, "params": params, "max_grad_norm": clip, "noise_multiplier": 0.0, "loss_fn": SEQ_CLS.loss_of}
    raw = [torch.cat([g.reshape(-1) for g in _plain_gradient_sum(model, params, [_collate([ex])])]) for ex in examples]
    assert min(float(r.norm()) for r in raw) > 10 * clip
    singles = [
        torch.cat([g.reshape(-1) for g in noisy_gradient_sum(**kw, batches=[_collate([ex])])]) for ex in examples
    ]
    for single, r in zip(singles, raw, strict=True):
        assert float(single.norm()) <= clip + 1e-6
        assert torch.allclose(single, r * clip / r.norm(), atol=1e-7, rtol=1e-3)  # scaled, not redirected
    together = torch.cat([g.reshape(-1) for g in noisy_gradient_sum(**kw, batches=[_collate(examples)])])
    assert torch.allclose(together, torch.stack(singles).sum(dim=0), atol=1e-7, rtol=1e-4)

    acc = ClientAccountant("rdp")
    sigma = 2.0
    noisy = noisy_gradient_sum(
        **{**kw, "noise_multiplier": sigma},
        batches=[_collate(examples)],
        generator=torch.Generator().manual_seed(0),
        accountant=acc,
    )
    noise = torch.cat([g.reshape(-1) for g in noisy]) - together
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.1)  # N(0, (σC)²) per coordinate
    assert acc.opacus.history == [(sigma, 1.0, 1)]
    assert acc.epsilon(DELTA) == epsilon_after(sigma, sample_rate=1.0, steps=1, delta=DELTA, accountant="rdp")


def test_noisy_gradient_sum_rejects_noise_without_clipping() -> None:
    model = _tiny_lora_bert()
    with pytest.raises(ValueError, match="finite clipping bound"):
        noisy_gradient_sum(
            model=model,
            params=list(_base_weights(model).values()),
            batches=[_collate(_examples(2))],
            max_grad_norm=math.inf,
            noise_multiplier=1.0,
            loss_fn=SEQ_CLS.loss_of,
        )


def _sampled_batches(sampling_seed: int | None, *, global_seed: int) -> list[list[int]]:
    """The labels of each Poisson batch one private loader draws (labels 0..31 identify the examples)."""
    model = _tiny_lora_bert()
    examples = _examples(32)
    for i, ex in enumerate(examples):
        ex["labels"] = torch.tensor(i)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model.train()
    gsm, _, dp_loader, _ = make_private(
        model=model,
        optimizer=opt,
        data_loader=DataLoader(examples, batch_size=8, collate_fn=_collate),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        accountant=ClientAccountant(),
        noise_seed=0,
        sampling_seed=sampling_seed,
        loss_fn=SEQ_CLS.per_example_loss,
    )
    assert isinstance(dp_loader, DPDataLoader)
    torch.manual_seed(global_seed)  # what the training loop does with the run's (the server's) seed
    batches = [batch["labels"].tolist() for batch in dp_loader]
    release(gsm)
    return batches


def test_a_sampling_seed_gives_poisson_sampling_its_own_generator_away_from_the_run_seeded_rng() -> None:
    """On a deployment node the training RNG is seeded from the server's run seed; a node that samples from it
    lets the server replay which examples each step used (privacy.noise). With `sampling_seed` the batches follow
    that seed only; without one (simulations) they follow the seeded training RNG, as before."""
    assert _sampled_batches(None, global_seed=1) == _sampled_batches(None, global_seed=1)
    assert _sampled_batches(None, global_seed=1) != _sampled_batches(None, global_seed=2)
    own = _sampled_batches(7, global_seed=1)
    assert own == _sampled_batches(7, global_seed=2)  # the run seed no longer decides the batches
    assert own != _sampled_batches(8, global_seed=1)
