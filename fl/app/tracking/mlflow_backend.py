"""`tracking=mlflow`: MLflow's client on an SQLite store in the run folder unless `tracking.uri` names one.

MLflow 3 keeps its file store (a folder of YAML files) in maintenance mode, behind ``MLFLOW_ALLOW_FILE_STORE``;
a database store needs no flag, so a run writes ``<run_dir>/mlflow.db`` with its artifacts (the adapter, the
plots) in ``<run_dir>/mlartifacts``. `tracking.uri` may name any MLflow URI (``http://host:5000``,
``sqlite:///path.db``, ``postgresql://...``), an ``.db`` file, or a folder, which then holds ``mlflow.db`` and
``mlartifacts/`` (a sweep's shared store). Open a run's store with plain MLflow::

    mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db

(the UI is in the full ``mlflow`` package; this framework needs only ``mlflow-skinny``, plus SQLAlchemy and
alembic, which Flower already installs). MLflow builds a new SQLite store's tables with its migrations: a few
seconds once per store.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig

from fl.app.tracking.base import Tracker, tag_pairs

PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
PARAM_CHARS = 6000  # MLflow's limit on a param value
STORE_FILE = "mlflow.db"  # the SQLite store in a run folder (or in the folder `tracking.uri` names)
ARTIFACTS_DIR = "mlartifacts"  # beside it: what the store's new experiments keep as artifacts


def store_paths(tracking: DictConfig, run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for the store's own default).

    No `tracking.uri`: ``sqlite:///<run_dir>/mlflow.db`` and ``<run_dir>/mlartifacts``. A URI with a scheme is
    used as it is; a path ending in ``.db`` is that SQLite file; any other path is a folder holding both.
    """
    uri = str(tracking.uri) if tracking.uri else ""
    if "://" in uri or uri.startswith("file:"):
        return uri, None
    path = Path(uri).expanduser().resolve() if uri else Path(run_dir).resolve()
    db = path if path.suffix == ".db" else path / STORE_FILE
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}", (db.parent / ARTIFACTS_DIR).as_uri()


def store_uri(tracking: DictConfig, run_dir: Path) -> str:
    """The tracking URI a run writes to (`store_paths`): what ``MlflowClient(tracking_uri=...)`` reads back."""
    return store_paths(tracking, run_dir)[0]


def _store_lock(uri: str) -> contextlib.AbstractContextManager[object]:
    """An exclusive lock on an SQLite store (``<store>.lock``); no lock for a server or another database."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(uri[len("sqlite:///") :] + ".lock")


class MlflowTracker(Tracker):
    """One MLflow run in experiment `tracking.experiment`, named `tracking.run_name` (default the folder's)."""

    def __init__(self, tracking: DictConfig, *, run_dir: Path) -> None:
        uri, artifacts = store_paths(tracking, run_dir)
        from mlflow.tracking import MlflowClient

        name = str(tracking.experiment)
        # A sweep's parallel cells (fl-sweep --launcher joblib) share one SQLite store: the first to open it builds
        # MLflow's tables, and two at once fail ("Online migration expected to match one row", "duplicate column
        # name"), as do two creating the same experiment. One lock file beside the store serialises opening it
        # (filelock: the lock package huggingface_hub and torch already use).
        with _store_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(name)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(name, artifact_location=artifacts)
            )
            run_name = str(tracking.run_name or Path(run_dir).name)
            run = self.client.create_run(exp_id, run_name=run_name, tags=tag_pairs(tracking.tags))
        self.run_id = run.info.run_id
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
