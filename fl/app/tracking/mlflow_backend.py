"""`tracking=mlflow`: MLflow's client on a local file store in <run_dir>/mlruns unless `tracking.uri` names one.

MLflow 3 keeps its file store only behind ``MLFLOW_ALLOW_FILE_STORE=true``, which is set here (unless the user
set it) when the URI is a folder. Open it with ``mlflow ui --backend-store-uri <run_dir>/mlruns`` (the UI is in
the full ``mlflow`` package; this framework needs only ``mlflow-skinny``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig

from fl.app.tracking.base import Tracker, tag_pairs

PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
PARAM_CHARS = 6000  # MLflow's limit on a param value


def store_uri(tracking: DictConfig, run_dir: Path) -> str:
    """`tracking.uri`, or a file store in <run_dir>/mlruns (a plain folder path becomes a file: URI)."""
    uri = str(tracking.uri) if tracking.uri else str(Path(run_dir) / "mlruns")
    if "://" not in uri and not uri.startswith("file:"):
        uri = Path(uri).resolve().as_uri()
    return uri


class MlflowTracker(Tracker):
    """One MLflow run in experiment `tracking.experiment`, named `tracking.run_name` (default the folder's)."""

    def __init__(self, tracking: DictConfig, *, run_dir: Path) -> None:
        uri = store_uri(tracking, run_dir)
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = str(tracking.experiment)
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        run_name = str(tracking.run_name or Path(run_dir).name)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tag_pairs(tracking.tags)).info.run_id
        self.uri = uri

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifacts(self, adapter_dir: Path | None, plots: Sequence[Path]) -> None:
        if adapter_dir is not None and Path(adapter_dir).is_dir():
            self.client.log_artifacts(self.run_id, str(adapter_dir), artifact_path="adapter")
        for plot in plots:
            self.client.log_artifact(self.run_id, str(plot), artifact_path="plots")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def make(tracking: DictConfig, *, run_dir: Path) -> Tracker:
    return MlflowTracker(tracking, run_dir=run_dir)
