"""model.lora_layers: adapters only in the listed transformer blocks (PEFT layers_to_transform)."""

from __future__ import annotations

import pytest

from fl.adapters import A_SUFFIX, trainable_state
from fl.app.workspace import get_workspace


@pytest.mark.parametrize("strategy", ["fedit", "ffa_lora", "fed_sb"])
def test_only_listed_blocks_get_adapters(strategy: str) -> None:
    ws = get_workspace(["model=tiny", f"strategy={strategy}", "model.lora_layers=[1]", "data.max_examples=64"])
    adapted = {n for n, _ in ws.model.named_parameters() if ".lora_" in n}
    assert adapted, "no adapter at all"
    assert all(".layer.1." in n for n in adapted), sorted(adapted)[:3]
    full = get_workspace(["model=tiny", f"strategy={strategy}", "data.max_examples=64"])
    every = {n for n, _ in full.model.named_parameters() if ".lora_" in n}
    assert any(".layer.0." in n for n in every) and len(adapted) == len(every) // 2
    # what a client sends shrinks with it (the head still trains in full)
    assert len(trainable_state(ws.model)) < len(trainable_state(full.model))
    assert any(n.endswith(A_SUFFIX) for n in adapted)


def test_a_block_the_model_lacks_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"model\.lora_layers=\[7\].*0\.\.1"):
        get_workspace(["model=tiny", "model.lora_layers=[7]", "data.max_examples=64"])
