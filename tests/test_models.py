"""Model loading: any local path works like a hub name; a head that does not fit the labels is named."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification

from fl.app.config import compose
from fl.models import linear_module_names
from fl.tasks import load_base_model


def _save_tiny(path: Path, num_labels: int) -> Path:
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    BertForSequenceClassification(cfg).save_pretrained(str(path))
    return path


def test_local_path_loads_through_the_real_loader(tmp_path: Path) -> None:
    path = _save_tiny(tmp_path / "m", num_labels=3)
    cfg = compose(["model=hf", f"model.name={path}", "model.tokenizer=minilm"])
    model = load_base_model(cfg.model, num_labels=3, seed=0)
    assert model.config.num_labels == 3
    names = linear_module_names(model, ["all-linear"])
    assert len(names) == 6 and not any("pooler" in n or "classifier" in n for n in names)


def test_head_with_other_label_count_is_a_clear_error(tmp_path: Path) -> None:
    path = _save_tiny(tmp_path / "m2", num_labels=2)
    cfg = compose(["model=hf", f"model.name={path}"])
    with pytest.raises(ValueError, match=r"model\.name"):
        load_base_model(cfg.model, num_labels=3, seed=0)


def test_missing_local_model_folder_is_named() -> None:
    cfg = compose(["model=hf", "model.name=/no/such/model"])
    with pytest.raises(FileNotFoundError, match=r"model\.name"):
        load_base_model(cfg.model, num_labels=3, seed=0)


def test_exported_adapter_names_the_public_base_model(tmp_path: Path) -> None:
    import json

    from fl.adapters import build_adapter, export_peft

    cfg = compose(["model=minilm"])
    base = load_base_model(cfg.model, num_labels=3, seed=0)
    model = build_adapter(base, kind="lora", strategy_cfg=cfg.strategy, targets=["all-linear"], seed=0)
    out = export_peft(model, kind="lora", base=base, out_dir=tmp_path / "a")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
