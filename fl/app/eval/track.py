"""Add fl-eval's scores to the tracking run the training run wrote (`tracking=mlflow|tensorboard|wandb`).

The training run's tracker is closed by then, so each backend's run is found again where that run put it:
MLflow's by its run name in `tracking.experiment` of the same store (`fl.app.tracking.mlflow_backend.store_paths`),
TensorBoard's log folder (`tensorboard_backend.log_dir`: a new event file beside the run's), W&B's latest run
folder under ``<tracking.uri or run_dir>/wandb`` (resumed by its id; an offline run syncs as one run). The scores
are logged at step = the run's last round, named ``eval/<task>/<metric>`` (``eval_base/...`` for the base model).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig

from fl.app.tracking import check_backend

log = logging.getLogger(__name__)


def flat_scores(prefix: str, tasks: Mapping[str, Mapping[str, float | int]]) -> dict[str, float]:
    """{"<prefix>/<task>/<metric>": value}, the example count ``n`` left out."""
    return {f"{prefix}/{t}/{m}": float(v) for t, ms in tasks.items() for m, v in ms.items() if m != "n"}


def log_scores(cfg: DictConfig, run_dir: Path, scores: Mapping[str, float], *, step: int) -> str | None:
    """Log `scores` to the run's tracking backend; what was written to (for the log line), None for tracking=none."""
    backend = str(cfg.tracking.backend)
    if backend == "none" or not scores:
        return None
    check_backend(backend)
    if backend == "mlflow":
        return _mlflow(cfg.tracking, run_dir, scores, step)
    if backend == "tensorboard":
        return _tensorboard(cfg.tracking, run_dir, scores, step)
    if backend == "wandb":
        return _wandb(cfg.tracking, run_dir, scores, step)
    raise ValueError(f"tracking={backend!r}: fl-eval cannot log to it.")


def _mlflow(tracking: DictConfig, run_dir: Path, scores: Mapping[str, float], step: int) -> str | None:
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from fl.app.tracking.mlflow_backend import store_paths

    uri, _ = store_paths(tracking, run_dir)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(str(tracking.experiment))
    name = str(tracking.run_name or Path(run_dir).name)
    runs = (
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"attributes.run_name = '{name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if exp is not None
        else []
    )
    if not runs:
        log.warning("No MLflow run named %r in experiment %r at %s: scores not tracked", name, tracking.experiment, uri)
        return None
    run_id = runs[0].info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in scores.items()])
    return f"MLflow run {run_id} ({uri})"


def _tensorboard(tracking: DictConfig, run_dir: Path, scores: Mapping[str, float], step: int) -> str:
    from torch.utils.tensorboard import SummaryWriter

    from fl.app.tracking.tensorboard_backend import log_dir

    folder = log_dir(tracking, run_dir)
    writer = SummaryWriter(log_dir=str(folder))
    for k, v in scores.items():
        writer.add_scalar(k, v, global_step=step)
    writer.close()
    return f"TensorBoard {folder}"


def _wandb(tracking: DictConfig, run_dir: Path, scores: Mapping[str, float], step: int) -> str | None:
    import wandb

    root = (Path(str(tracking.uri)) if tracking.uri else Path(run_dir)) / "wandb"
    folders = sorted(p for p in root.glob("*run-*-*") if p.is_dir()) if root.is_dir() else []
    if not folders:
        log.warning("No W&B run folder under %s: scores not tracked", root)
        return None
    run_id = folders[-1].name.rsplit("-", 1)[-1]
    run = wandb.init(
        id=run_id,
        resume="allow",
        mode="online" if str(tracking.mode) == "online" else "offline",
        dir=str(root.parent),
        project=str(tracking.experiment),
        settings=wandb.Settings(silent=True, console="off"),
        reinit="finish_previous",
    )
    run.log(dict(scores), step=step)
    run.summary.update(dict(scores))
    run.finish()
    wandb.teardown()  # flush the offline run file before returning (see wandb_backend.finish)
    return f"W&B run {run_id} ({root})"
