"""Every strategy through the real ServerApp and ClientApp (tiny model, 2 clients, 2 rounds; in-process via
`LoopGrid`, which reproduces the Simulation Runtime's numbers exactly, see test_reliability.py): bytes match the
formula for the tensors it sends, residuals behave as each method's maths says, exports reload with plain PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from loop_grid import LoopGrid
from peft import PeftModel

from fl.app.server_app import run_server
from fl.app.workspace import get_workspace
from fl.data import IndexedDataset
from fl.outputs import read_metrics
from fl.tasks import load_base_model
from fl.tasks.classification import collate
from strategies import names

H, INTER, LAYERS, LABELS, R, CLIENTS, ROUNDS = 32, 64, 2, 3, 4, 2, 2
HEAD = H * LABELS + LABELS
MODULES = [(H, H)] * 4 + [(INTER, H), (H, INTER)]  # (d_out, d_in) per layer: q, k, v, attn-out, intermediate, output
HEADER = 128  # numpy .npy header bytes per array in Flower's wire format


def trainable_floats(strategy: str) -> int:
    if strategy in ("fedit", "lora_fair"):
        per_layer = sum(R * d_in + d_out * R for d_out, d_in in MODULES)
    elif strategy == "ffa_lora":
        per_layer = sum(d_out * R for d_out, _ in MODULES)
    else:
        per_layer = len(MODULES) * R * R
    return LAYERS * per_layer + HEAD


def frozen_floats() -> int:
    """Fed-SB's A and B, sent once per client."""
    return LAYERS * sum(R * d_in + d_out * R for d_out, d_in in MODULES)


def dense_floats() -> int:
    """Fed-SB's init gradient: every adapted W0."""
    return LAYERS * sum(d_out * d_in for d_out, d_in in MODULES)


@pytest.fixture(scope="module", params=["fedit", "ffa_lora", "lora_fair", "fed_sb"])
def run(request: pytest.FixtureRequest, tiny: list[str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    strategy = request.param
    run_dir = tmp_path_factory.mktemp(strategy) / "run"
    overrides = [
        *tiny,
        f"strategy={strategy}",
        f"strategy.rank={R}",
        f"sim.num_clients={CLIENTS}",
        f"sim.rounds={ROUNDS}",
        "data.partitioner=iid",
        f"run_dir={run_dir}",
    ]
    if strategy == "lora_fair":
        overrides.append("strategy.steps=50")
    return strategy, run_server(LoopGrid(CLIENTS), overrides), overrides


def test_all_four_are_registered() -> None:
    assert set(names()) >= {"fedit", "ffa_lora", "lora_fair", "fed_sb"}


def test_floats_and_bytes_match_the_formula(run) -> None:  # type: ignore[no-untyped-def]
    strategy, run_dir, _ = run
    rows = read_metrics(run_dir)
    per_client = trainable_floats(strategy)
    for row in rows[1:]:
        assert row["floats_up"] == CLIENTS * per_client
        down = CLIENTS * per_client + (CLIENTS * frozen_floats() if strategy == "fed_sb" and row["round"] == 1 else 0)
        assert row["floats_down"] == down
        # bytes = 4 per float + per-array header and key, nothing else
        assert 4 * row["floats_up"] < row["bytes_up"] < 4 * row["floats_up"] + CLIENTS * 40 * (HEADER + 120)
    if strategy == "fed_sb":
        assert rows[0]["floats_up"] == CLIENTS * dense_floats()  # the one-time init gradients


def test_residual_is_zero_only_for_exact_methods(run) -> None:  # type: ignore[no-untyped-def]
    strategy, run_dir, _ = run
    rows = read_metrics(run_dir)[1:]
    for row in rows:
        if strategy in ("ffa_lora", "fed_sb"):
            assert row["residual"] < 1e-5
        elif strategy == "fedit":
            assert row["residual"] > 1e-4
        else:
            assert row["residual_after"] <= row["residual_before"] + 1e-9
            assert row["solve_seconds"] > 0


def test_export_reloads_to_the_same_logits(run) -> None:  # type: ignore[no-untyped-def]
    _, run_dir, overrides = run
    ws = get_workspace(overrides)
    reloaded = PeftModel.from_pretrained(
        load_base_model(ws.cfg.model, num_labels=ws.num_labels, seed=int(ws.cfg.seed)), str(run_dir / "adapter")
    ).eval()
    ds = IndexedDataset(ws.task.test)
    batch = collate([ds[i] for i in range(32)], ws.pad_id)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, ws.model(**batch).logits, atol=1e-5)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    assert summary["strategy"] == ws.cfg.strategy.name
