"""`tracking=mlflow` writes an SQLite store in the run folder that plain MLflow reads: with no MLflow environment
flag set before, during or after the run (MLflow 3 refuses its file store without ``MLFLOW_ALLOW_FILE_STORE``),
``MlflowClient(tracking_uri=...)`` reads back the run's metrics, params and artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loop_grid import LoopGrid
from omegaconf import OmegaConf

from fl.app.server_app import run_server
from fl.app.tracking import numeric_metrics
from fl.app.tracking.mlflow_backend import store_paths, store_uri
from fl.outputs import read_metrics


def test_store_paths() -> None:
    def paths(uri: str | None) -> tuple[str, str | None]:
        return store_paths(OmegaConf.create({"uri": uri}), Path("/tmp/fl-run"))

    assert paths(None) == ("sqlite:////tmp/fl-run/mlflow.db", "file:///tmp/fl-run/mlartifacts")
    assert paths("/tmp/fl-sweep/mlruns") == (
        "sqlite:////tmp/fl-sweep/mlruns/mlflow.db",
        "file:///tmp/fl-sweep/mlruns/mlartifacts",
    )
    assert paths("/tmp/fl-x/t.db") == ("sqlite:////tmp/fl-x/t.db", "file:///tmp/fl-x/mlartifacts")
    assert paths("http://host:5000") == ("http://host:5000", None)


def test_a_tracked_run_reads_back_with_plain_mlflow(
    tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    overrides = [*tiny, "sim.num_clients=2", "sim.rounds=1", "data.partitioner=iid", "tracking=mlflow"]
    run_dir = run_server(LoopGrid(2), [*overrides, f"run_dir={tmp_path / 'run'}"])
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # the run set no flag for itself either
    assert (run_dir / "mlflow.db").is_file() and not (run_dir / "mlruns").exists()
    uri = store_uri(OmegaConf.create({"uri": None}), run_dir)
    assert uri == f"sqlite:///{run_dir.resolve()}/mlflow.db"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fedlora")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    rid = run.info.run_id
    got = {k: {m.step: m.value for m in client.get_metric_history(rid, k)} for k in run.data.metrics}
    arts = [a.path for a in client.list_artifacts(rid)] + [a.path for a in client.list_artifacts(rid, "adapter")]
    want: dict[str, dict[int, float]] = {}
    for row in read_metrics(run_dir):
        for k, v in numeric_metrics(row).items():
            want.setdefault(k, {})[int(row["round"])] = v
    assert set(got) == set(want) and set(want["accuracy"]) == {0, 1}
    for key, by_round in want.items():
        assert got[key] == pytest.approx(by_round, rel=1e-6), key
    assert run.data.params["tracking.backend"] == "mlflow" and run.info.status == "FINISHED"
    assert "adapter/adapter_config.json" in arts and "plots" in arts
    assert run.info.artifact_uri.startswith((run_dir.resolve() / "mlartifacts").as_uri())
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
