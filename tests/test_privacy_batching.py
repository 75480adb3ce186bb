"""DP-SGD at large logical batches: q is planned and charged for the logical batch, memory sees the physical one,
and Opacus' ghost clipping gives the hooks mode's clipped gradient sum on every adapter kind."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule
from torch.utils.data import DataLoader

from clients.train import local_train, make_loader, split_batch
from fl.adapters import build_adapter
from fl.app.config import compose
from fl.data import IndexedDataset, TokenizedSplit
from fl.tasks import get_task, load_base_model
from fl.tasks.classification import collate
from privacy import ClientAccountant, PrivacySettings, client_plan, make_private, release, sample_rate, steps_per_round

SEQ_CLS = get_task("seq_cls")  # the tiny models here are sequence classifiers

model_inputs = SEQ_CLS.model_inputs
classification_loss = SEQ_CLS.per_example_loss


def _tiny(kind: str = "lora", n: int = 64, seed: int = 0) -> tuple[torch.nn.Module, IndexedDataset]:
    cfg = compose(["model=tiny", "strategy.rank=4", "strategy.dropout=0.0"])
    model = build_adapter(
        load_base_model(cfg.model, num_labels=3, seed=seed),
        kind=kind,
        strategy_cfg=cfg.strategy,
        targets=["all-linear"],
        seed=seed,
    )
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 300, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen) for _ in range(n)]
    labels = torch.randint(0, 3, (n,), generator=gen)
    if kind == "fedsb":  # R starts at 0; give it a value so every trainable tensor gets a gradient
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and name.endswith(".R.weight"):
                    p.normal_(0, 0.1, generator=gen)
    return model, IndexedDataset(TokenizedSplit(ids, labels))


def _no_dropout(model: torch.nn.Module) -> None:
    """Training mode (Opacus records activations only then) with every dropout off: a deterministic function."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_the_logical_batch_is_planned_and_charged_the_physical_one_is_what_runs(mode: str) -> None:
    model, data = _tiny(n=64)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    acc = ClientAccountant("rdp")
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(len(kw["input_ids"])), with_kwargs=True)

    def wrap(m, o, loader):  # type: ignore[no-untyped-def]
        return make_private(
            model=m,
            optimizer=o,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            accountant=acc,
            grad_sample_mode=mode,
            loss_fn=SEQ_CLS.per_example_loss,
        )

    res = local_train(
        model,
        data,
        steps=3,
        batch_size=32,
        physical_batch_size=8,
        lr=1e-2,
        weight_decay=0.0,
        pad_id=0,
        seed=1,
        wrap=wrap,
    )
    handle.remove()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # it trained
    assert res.steps == 3 and acc.steps == 3  # one charge per logical batch, not per physical one
    assert acc.opacus.history == [(1.0, sample_rate(64, 32), 3)] and sample_rate(64, 32) == 0.5
    assert max(seen) <= 8 and sum(seen) > 3 * 8  # memory sees ≤ 8 examples; the logical batches were larger
    assert res.examples_seen == sum(seen)  # Poisson batches: what went through the model, reported

    cfg = compose(["model=tiny", "privacy=dp", "privacy.batch_size=32", "train.batch_size=8", "train.local_epochs=2"])
    settings = PrivacySettings.from_config(cfg, init_releases=0)
    assert (settings.logical_batch, settings.physical_batch) == (32, 8)
    plan = client_plan(settings, 640)
    assert plan.sample_rate == sample_rate(640, 32) and plan.steps_per_round == steps_per_round(settings, 640) == 40
    off = PrivacySettings.from_config(
        compose(["model=tiny", "privacy=off", "privacy.batch_size=32", "train.batch_size=8"]), init_releases=0
    )
    assert off.logical_batch == off.physical_batch == 8  # without DP nothing changes


def _clipped_sum(kind: str, mode: str, *, physical: int, clip: float) -> dict[str, torch.Tensor]:
    """The DP optimizer's gradient (clipped sum / expected batch, σ = 0) for one fixed logical batch of 12."""
    model, data = _tiny(kind, n=12)
    loader = DataLoader(data, batch_size=12, collate_fn=lambda b: collate(b, 0))
    batch = next(iter(loader))
    params = [p for p in model.parameters() if p.requires_grad]
    _no_dropout(model)
    private = make_private(
        model=model,
        optimizer=torch.optim.SGD(params, lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        accountant=ClientAccountant(),
        poisson_sampling=False,
        grad_sample_mode=mode,
        loss_fn=classification_loss,
    )
    chunks = split_batch(batch, physical)
    for i, chunk in enumerate(chunks):
        private.optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
        private.objective(private.module(**model_inputs(chunk)), chunk).backward()
        if i < len(chunks) - 1:
            private.optimizer.step()
            private.optimizer.zero_grad(set_to_none=True)
    assert private.optimizer.pre_step()  # noise (σ = 0) and scaling, without the SGD update
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    release(private.module)
    assert len(out) == len(params)
    return out


@pytest.mark.parametrize(
    ("kind", "clip"), [("lora", 1e-3), ("ffa", 1e-3), ("fedsb", 1e-3), ("lora", 10.0)]
)  # every example clipped / none clipped
def test_ghost_clipping_gives_the_hooks_clipped_gradient_sum(kind: str, clip: float) -> None:
    hooks = _clipped_sum(kind, "hooks", physical=12, clip=clip)
    ghost = _clipped_sum(kind, "ghost", physical=12, clip=clip)
    ghost_split = _clipped_sum(kind, "ghost", physical=5, clip=clip)  # 5 + 5 + 2 physical batches
    hooks_split = _clipped_sum(kind, "hooks", physical=5, clip=clip)
    for name, g in hooks.items():
        scale = float(g.abs().max()) + 1e-12
        for other in (ghost, ghost_split, hooks_split):
            assert torch.allclose(other[name], g, rtol=1e-4, atol=1e-5 * scale), name
    if clip < 1:  # each example clipped to norm `clip`: their sum / 12 has norm ≤ clip
        total = sum(float(g.pow(2).sum()) for g in hooks.values()) ** 0.5
        assert total <= clip * (1 + 1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_dp_step_on_a_frozen_base_does_not_warn_about_full_backward_hooks(mode: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the objective's scoped filter goes in front of this one, as in a real run
        _clipped_sum("lora", mode, physical=5, clip=1.0)
    assert not [w for w in caught if "Full backward hook" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # the same backward without make_private does warn
        warnings.simplefilter("always")
        model, data = _tiny("lora", n=4)
        _no_dropout(model)  # train mode: Opacus records activations only then
        batch = next(iter(DataLoader(data, batch_size=4, collate_fn=lambda b: collate(b, 0))))
        GradSampleModule(model)(**model_inputs(batch)).logits.sum().backward()
    assert [w for w in caught if "Full backward hook" in str(w.message)]


def test_non_dp_accumulation_over_physical_batches_is_one_big_batch() -> None:
    grads = []
    for physical in (16, 4):
        model, data = _tiny("lora", n=16)
        _no_dropout(model)
        batch = next(iter(make_loader(data, batch_size=16, pad_id=0, seed=0)))
        params = [p for p in model.parameters() if p.requires_grad]
        for chunk in split_batch(batch, physical):
            (classification_loss(model(**model_inputs(chunk)), chunk).sum() / 16).backward()
        grads.append([p.grad.clone() for p in params])  # type: ignore[union-attr]
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_physical_batches_go_by_length_and_drop_the_logical_batch_padding() -> None:
    _, data = _tiny("lora", n=32)
    batch = next(iter(make_loader(data, batch_size=32, pad_id=0, seed=0)))
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.min()) < batch["input_ids"].shape[1]  # the data has padding to save
    chunks = split_batch(batch, 8)
    assert [len(c["labels"]) for c in chunks] == [8, 8, 8, 8]
    widths = [c["input_ids"].shape[1] for c in chunks]
    assert widths == sorted(widths) and widths[0] < batch["input_ids"].shape[1]
    seen = set()
    for c in chunks:
        assert c["attention_mask"].shape == c["input_ids"].shape
        assert int(c["attention_mask"].sum(1).max()) == c["input_ids"].shape[1]  # cut to its own longest
        for ids, m, y in zip(c["input_ids"], c["attention_mask"], c["labels"], strict=True):
            seen.add((tuple(ids[m.bool()].tolist()), int(y)))
    whole = {
        (tuple(ids[m.bool()].tolist()), int(y))
        for ids, m, y in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True)
    }
    assert seen == whole  # every example once, tokens intact
    left = {k: v.clone() for k, v in batch.items()}
    left["attention_mask"] = left["attention_mask"].flip(1)  # left padding: split in order, not cut
    assert all(c["input_ids"].shape[1] == batch["input_ids"].shape[1] for c in split_batch(left, 8))
    assert split_batch(batch, 32)[0]["input_ids"].shape == batch["input_ids"].shape
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        split_batch(batch, 0)


@pytest.mark.parametrize("strategy", ["fed_sb", "ffa_lora", "fedit", "lora_fair"])
def test_the_dp_recipe_of_a_method_composes_and_sets_its_local_work(strategy: str) -> None:
    cfg = compose([f"strategy={strategy}", f"privacy=dp_{strategy}"])
    assert cfg.privacy.enabled and cfg.privacy.batch_size and cfg.privacy.batch_size > cfg.train.batch_size
    dp = PrivacySettings.from_config(cfg, init_releases=0)
    if cfg.privacy.local_steps:
        assert steps_per_round(dp, 3000) == cfg.privacy.local_steps
    off = compose([f"strategy={strategy}", "privacy=off"])
    plain = PrivacySettings.from_config(off, init_releases=0)
    assert steps_per_round(plain, 3000) == off.train.local_steps  # the recipe's local work is for DP only


def test_a_dp_recipe_sets_the_rounds_it_was_measured_at_and_the_command_line_still_wins() -> None:
    assert compose(["strategy=fed_sb", "privacy=dp_fed_sb"]).sim.rounds == 3  # privacy composes after sim
    assert compose(["strategy=fed_sb", "privacy=dp_fed_sb", "sim.rounds=5"]).sim.rounds == 5
    assert compose(["privacy=off"]).sim.rounds == compose([]).sim.rounds == 6  # the default job's rounds
