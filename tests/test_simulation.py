"""A real Flower simulation (Simulation Runtime on Ray): tiny model, 2 clients, 2 rounds."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import torch
from peft import PeftModel

from fl.adapters import load_tensors
from fl.app.simulation import run_simulation
from fl.app.workspace import get_workspace
from fl.checkpoint import Checkpoint
from fl.data import IndexedDataset
from fl.outputs import read_metrics
from fl.tasks import load_base_model
from fl.tasks.classification import collate
from fl.wire import from_record

SIM = ["sim.num_clients=2", "sim.rounds=2", "data.partitioner=iid"]


def _no_ray_children(grace: float = 30.0) -> list[str]:
    """Ray/Flower processes under this one still alive `grace` s after the run returned (exiting ones may race)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(s in " ".join(p.cmdline()) for s in ("raylet", "gcs_server", "ray::", "flower-")):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):  # already gone: not a leftover
            continue
    _, alive = psutil.wait_procs(found, timeout=grace)
    return [f"{p.pid}" for p in alive]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny: list[str]) -> tuple[Path, list[str]]:
    run_dir = tmp_path_factory.mktemp("sim") / "run"
    overrides = [*tiny, *SIM, f"run_dir={run_dir}"]
    return run_simulation(overrides), overrides


def test_outputs_are_written(run: tuple[Path, list[str]]) -> None:
    run_dir, _ = run
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("accuracy", "loss", "bytes_up", "bytes_down", "wall_seconds", "residual"):
            assert key in r, key
        assert r["aggregated"] == 2 and r["failed"] == 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert "strategy:" in (run_dir / "config.yaml").read_text()
    assert not _no_ray_children()


def test_adapter_reloads_with_plain_peft_to_the_framework_predictions(
    run: tuple[Path, list[str]],
) -> None:
    run_dir, overrides = run
    ws = get_workspace(overrides)  # the framework's model, given the run's final trained state
    load_tensors(ws.model, Checkpoint.load(run_dir).arrays)
    reloaded = PeftModel.from_pretrained(
        load_base_model(ws.cfg.model, num_labels=ws.num_labels, seed=int(ws.cfg.seed)),
        str(run_dir / "adapter"),
    )
    reloaded.eval()
    ds = IndexedDataset(ws.task.test)
    batch = collate([ds[i] for i in range(len(ds))], ws.pad_id)
    labels = batch.pop("labels")
    with torch.no_grad():
        theirs = reloaded(**batch).logits
        ours = ws.model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    correct = int((theirs.argmax(-1) == labels).sum())
    assert correct / len(ds) == read_metrics(run_dir)[-1]["accuracy"]


def test_the_inline_runtime_gives_the_ray_runs_metrics(run: tuple[Path, list[str]], tmp_path: Path) -> None:
    """The same overrides on `sim.runtime=inline` (fl.app.inline: every ClientApp call in this process) end with
    the Ray run's metrics, to the bit: the tests and tiny sweeps that run inline measure what Ray would."""
    run_dir, overrides = run
    same = [o for o in overrides if not o.startswith("run_dir=")]
    again = run_simulation([*same, "sim.runtime=inline", f"run_dir={tmp_path / 'again'}"])
    a, b = read_metrics(run_dir), read_metrics(again)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        for key in ("accuracy", "loss", "bytes_up", "bytes_down", "residual", "train_loss"):
            assert ra.get(key) == rb.get(key), (key, ra.get(key), rb.get(key))
    assert not _no_ray_children()


def test_wire_record_roundtrip() -> None:
    from fl.wire import to_record

    state = {"b": torch.randn(3, 2), "a": torch.randn(4)}
    back = from_record(to_record(state))
    assert set(back) == {"a", "b"} and all(torch.equal(back[k], state[k]) for k in state)


def test_an_impossible_partitioning_stops_the_run_before_it_starts(tiny: list[str], tmp_path: Path) -> None:
    """Seen in the budget sweep: Dirichlet α=0.1 over 20 clients failed every client in every round and the
    run "finished" untrained at the initial accuracy. It must stop at once, naming the fields to change."""
    bad = [*tiny, "sim.num_clients=20", "data.alpha=0.1", "data.min_partition_size=25", f"run_dir={tmp_path / 'r'}"]
    with pytest.raises(ValueError, match=r"data\.alpha.*data\.min_partition_size"):
        run_simulation(bad)
    assert not (tmp_path / "r" / "metrics.jsonl").exists() and not _no_ray_children()
