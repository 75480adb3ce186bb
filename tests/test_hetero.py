"""Heterogeneous-rank methods end to end on the tiny model: the real ServerApp and ClientApp (in process, one
Context per node), clients at mixed ranks from `sim.client_ranks` or from each node's config `lora-rank`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loop_grid import LoopGrid
from peft import PeftModel

from fl.app.server_app import run_server
from fl.outputs import read_metrics
from fl.tasks import load_base_model

HETERO = ["flora", "flexlora", "hetlora"]


def _run(tiny: list[str], tmp_path: Path, strategy: str, *extra: str, node_ranks: list[int] | None = None) -> Path:
    nodes = 3 if node_ranks is None else len(node_ranks)
    grid = LoopGrid(nodes)
    for (_, ctx), rank in zip(sorted(grid.contexts.items()), node_ranks or [], strict=False):
        ctx.node_config["lora-rank"] = rank
    overrides = [
        *tiny,
        f"strategy={strategy}",
        "strategy.rank=4",
        f"sim.num_clients={nodes}",
        "sim.rounds=2",
        "data.max_examples=240",
        "data.partitioner=iid",
        "train.local_steps=2",
        f"run_dir={tmp_path / 'run'}",
        *extra,
    ]
    return run_server(grid, overrides)


@pytest.mark.parametrize("strategy", HETERO)
def test_mixed_ranks_train_aggregate_and_export(tiny: list[str], tmp_path: Path, strategy: str) -> None:
    extra = ["sim.client_ranks=[2,4,3]"] + (["strategy.prune_gamma=0.5"] if strategy == "hetlora" else [])
    run_dir = _run(tiny, tmp_path, strategy, *extra)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["aggregated"] == 3 and r["rejected"] == 0 and r["client_ranks"] == [2, 4, 3]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["bytes_up"] > 0
    if strategy == "flexlora":  # the server's rank-4 truncation of ΔW = Σ p_k s_k B_k A_k (rank ≤ 9): inexact
        assert 0.0 < rows[-1]["residual"] < 1.0
    if strategy == "flora":  # stacking is exact; the stacks of every round so far go down
        assert rows[-1]["residual"] < 1e-5 and rows[2]["bytes_down"] > rows[1]["bytes_down"]
        assert (run_dir / "adapter" / "base_delta.safetensors").is_file()
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    from fl.app.config import compose

    base = load_base_model(compose(["model=tiny"]).model, num_labels=3, seed=0)
    PeftModel.from_pretrained(base, str(run_dir / "adapter"))  # a plain PEFT folder


def test_ranks_from_node_config(tiny: list[str], tmp_path: Path) -> None:
    """Deployment's way: each node says its own rank (`--node-config lora-rank=r`); no sim.client_ranks."""
    rows = read_metrics(_run(tiny, tmp_path, "flexlora", node_ranks=[2, 4]))
    assert rows[-1]["client_ranks"] == [2, 4] and rows[-1]["rejected"] == 0
    # each node's bytes follow its rank: a rank-2 node's factors are half a rank-4 node's (same modules)
    assert rows[1]["floats_up"] < 2 * rows[1]["floats_down"]
