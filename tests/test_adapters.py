"""Adapters: trainable tensors per method, seeded frozen factors, export to a plain PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fl.adapters import build_adapter, export_peft, fixed_state, freeze_head, load_tensors, trainable_state
from fl.app.config import compose
from fl.tasks import load_base_model

KINDS = ["lora", "ffa", "fedsb"]
HIDDEN, INTER, LAYERS, LABELS = 32, 64, 2, 3


def _build(kind: str, rank: int = 4, seed: int = 0) -> PeftModel:
    cfg = compose(["model=tiny", f"strategy.rank={rank}"])
    base = load_base_model(cfg.model, num_labels=LABELS, seed=seed)
    return build_adapter(base, kind=kind, strategy_cfg=cfg.strategy, targets=["all-linear"], seed=seed)


def _expected_floats(kind: str, r: int) -> int:
    """Formula: per layer 4 square (h x h) modules + intermediate (h -> i) + output (i -> h)."""
    head = HIDDEN * LABELS + LABELS
    if kind == "lora":
        per_layer = 4 * (r * HIDDEN + HIDDEN * r) + (r * HIDDEN + INTER * r) + (r * INTER + HIDDEN * r)
    elif kind == "ffa":  # only B travels
        per_layer = 4 * HIDDEN * r + INTER * r + HIDDEN * r
    else:  # Fed-SB: r x r per module
        per_layer = 6 * r * r
    return LAYERS * per_layer + head


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_tensor_count_matches_formula(kind: str) -> None:
    model = _build(kind, rank=4)
    state = trainable_state(model)
    assert sum(t.numel() for t in state.values()) == _expected_floats(kind, 4)
    assert any("classifier" in k for k in state)  # the head trains for every method


def test_ffa_a_is_frozen_and_identical_across_builds() -> None:
    a1, a2 = fixed_state(_build("ffa", seed=3)), fixed_state(_build("ffa", seed=3))
    assert a1 and all(k.endswith("lora_A.default.weight") for k in a1)
    assert all(torch.equal(a1[k], a2[k]) for k in a1)
    a3 = fixed_state(_build("ffa", seed=4))
    assert not all(torch.equal(a1[k], a3[k]) for k in a1)


def test_fedsb_starts_at_the_base_model_and_r_is_the_only_adapter_tensor() -> None:
    model = _build("fedsb")
    names = [n for n in trainable_state(model) if "lora" in n]
    assert names and all(n.endswith(".R.weight") for n in names)
    assert all(float(t.abs().sum()) == 0.0 for n, t in trainable_state(model).items() if "lora" in n)


@pytest.mark.parametrize("kind", KINDS)
def test_export_reloads_with_plain_peft_to_the_same_logits(kind: str, tmp_path: Path) -> None:
    model = _build(kind)
    gen = torch.Generator().manual_seed(1)
    load_tensors(
        model,
        {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in trainable_state(model).items()},
    )
    x = torch.randint(5, 500, (4, 12), generator=gen)
    mask = torch.ones_like(x)
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=mask).logits
    cfg = compose(["model=tiny"])
    out = export_peft(
        model,
        kind=kind,
        base=load_base_model(cfg.model, num_labels=LABELS, seed=0),
        out_dir=tmp_path / "adapter",
    )
    assert (out / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model, num_labels=LABELS, seed=0), str(out))
    reloaded.eval()
    with torch.no_grad():
        theirs = reloaded(input_ids=x, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_load_tensors_names_the_bad_key_and_shape() -> None:
    model = _build("lora")
    state = trainable_state(model)
    key = next(iter(state))
    with pytest.raises(ValueError, match="Shape mismatch"):
        load_tensors(model, {key: torch.zeros(1, 1)})
    with pytest.raises(KeyError, match="missing"):
        load_tensors(model, {key: state[key]}, expect=set(state))


@pytest.mark.parametrize("kind", ["lora", "ffa", "fedsb"])
def test_a_frozen_head_is_not_trained_nor_sent_and_is_the_same_seeded_head_everywhere(kind: str) -> None:
    trained = _build(kind)
    frozen = _build(kind)
    names = freeze_head(frozen)
    assert names and all("classifier" in n for n in names)  # weight and bias of the new head
    sent = trainable_state(frozen)
    assert not set(names) & set(sent) and set(sent) == set(trainable_state(trained)) - set(names)
    heads = dict(frozen.named_parameters())
    for n in names:  # what another node builds from the same seed: no need to send it
        assert not heads[n].requires_grad
        torch.testing.assert_close(heads[n], dict(trained.named_parameters())[n])
    assert compose(["train.freeze_head=true"]).train.freeze_head is True
