"""Experiment tracking: a tiny run tracked by each backend, read back with the backend's own reader, equals
metrics.jsonl; a sweep tracked as one MLflow experiment with one run per cell tagged with its swept keys."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from loop_grid import LoopGrid

from fl.app.server_app import run_server
from fl.app.tracking import numeric_metrics
from fl.outputs import read_metrics

NODES = 2
SIM = [f"sim.num_clients={NODES}", "sim.rounds=2", "data.partitioner=iid"]


def _expected(run_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for row in read_metrics(run_dir):
        for k, v in numeric_metrics(row).items():
            out.setdefault(k, {})[int(row["round"])] = v
    return out


def _mlflow(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, str], list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("fedlora")
    (run,) = client.search_runs([exp.experiment_id])
    got = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in run.data.metrics}
    arts = [a.path for a in client.list_artifacts(run.info.run_id)]
    arts += [a.path for a in client.list_artifacts(run.info.run_id, "adapter")]
    return got, run.data.params, arts


def _tensorboard(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (log_dir,) = (run_dir / "tensorboard").iterdir()
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {k: {e.step: e.value for e in acc.Scalars(k)} for k in acc.Tags()["scalars"]}


def wandb_records(path: Path) -> list[object]:
    """The records of a W&B run file (.wandb): W&B's LevelDB-style log (a 7-byte ':W&B' header, then 32 KiB
    blocks of records with a 7-byte header: CRC, length, type), each a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        partial += chunk
        if kind in (1, 4):  # FULL, LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(partial)
            records.append(rec)
            partial = b""
    return records


def _wandb(run_dir: Path) -> tuple[dict[str, dict[int, float]], list[str]]:
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    got: dict[str, dict[int, float]] = {}
    kinds = []
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")  # type: ignore[attr-defined]
        kinds.append(kind)
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}  # type: ignore[attr-defined]
            step = int(items.pop("_step"))
            for k, v in items.items():
                if not k.startswith("_"):
                    got.setdefault(k, {})[step] = float(v)
    return got, kinds


@pytest.mark.parametrize("backend", ["mlflow", "tensorboard", "wandb"])
def test_tracked_run_reads_back_equal_to_metrics_jsonl(backend: str, tiny: list[str], tmp_path: Path) -> None:
    # in-process (the real ServerApp, where the tracker lives, and ClientApp): Ray adds nothing to tracking
    run_dir = run_server(LoopGrid(NODES), [*tiny, *SIM, f"tracking={backend}", f"run_dir={tmp_path / 'run'}"])
    want = _expected(run_dir)
    assert set(want["accuracy"]) == {0, 1, 2}
    if backend == "mlflow":
        got, params, arts = _mlflow(run_dir)
        assert params["strategy.name"] == "ffa_lora" and params["sim.rounds"] == "2"
        assert "plots/accuracy_vs_round.png" in [a for a in arts] or "plots" in arts
        assert "adapter/adapter_config.json" in arts
    elif backend == "tensorboard":
        got = _tensorboard(run_dir)
    else:
        got, kinds = _wandb(run_dir)
        assert "run" in kinds and "artifact" in kinds
        assert kinds[-1] == "exit"  # the file is complete when the run has ended (W&B's service flushed it)
    assert set(got) == set(want)
    for key, by_round in want.items():
        assert got[key] == pytest.approx(by_round, rel=1e-6), key
