"""Data: the embedded tweets, local files, partitions from flwr-datasets, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl.app.config import compose
from fl.data import load_pool, partition_indices
from fl.models import load_tokenizer
from fl.tasks.classification import build_task_data


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_tokenizer(compose(["model=tiny"]).model)


def test_embedded_tweets_are_real(tokenizer, cache_dir: str) -> None:  # type: ignore[no-untyped-def]
    pool = load_pool(compose([]).data)
    assert len(pool) == 38158
    labels = pd.Series(pool["label"]).value_counts().to_dict()
    assert labels == {"negative": 16186, "neutral": 15018, "positive": 6954}


def _task(tokenizer, cache_dir: str, *over: str):  # type: ignore[no-untyped-def]
    cfg = compose(["model=tiny", "data.max_examples=3000", "data.test_size=200", *over])
    return cfg, build_task_data(cfg.data, tokenizer, seed=0, cache_dir=cache_dir)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover_the_pool(tokenizer, cache_dir: str, partitioner: str) -> None:  # type: ignore[no-untyped-def]
    cfg, task = _task(tokenizer, cache_dir, f"data.partitioner={partitioner}")
    parts = partition_indices(task, cfg.data, num_partitions=10, seed=0)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(set(allidx.tolist()))
    if partitioner != "pathological":
        assert len(allidx) == len(task.train)
    if partitioner == "pathological":
        assert all(len(set(task.train_labels[p].tolist())) <= 2 for p in parts)


def test_dirichlet_alpha_controls_heterogeneity(tokenizer, cache_dir: str) -> None:  # type: ignore[no-untyped-def]
    def skew(alpha: float) -> float:
        cfg, task = _task(tokenizer, cache_dir, f"data.alpha={alpha}")
        parts = partition_indices(task, cfg.data, num_partitions=10, seed=0)
        # mean over clients of the largest class share
        return float(np.mean([np.bincount(task.train_labels[p], minlength=3).max() / len(p) for p in parts]))

    assert skew(0.1) > skew(100.0) + 0.15


def test_test_split_is_fixed_and_held_out(tokenizer, cache_dir: str) -> None:  # type: ignore[no-untyped-def]
    _, a = _task(tokenizer, cache_dir)
    _, b = _task(tokenizer, cache_dir)
    assert len(a.test) == 200
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.test.input_ids, b.test.input_ids, strict=True))


def test_local_csv_with_custom_columns(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"body": [f"text number {i}" for i in range(300)], "y": rng.integers(0, 2, 300)})
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    cfg = compose(
        [
            "model=tiny",
            "data=file",
            f"data.path={path}",
            "data.text_column=body",
            "data.label_column=y",
            "data.test_size=50",
        ]
    )
    task = build_task_data(cfg.data, tokenizer, seed=0, cache_dir=str(tmp_path / "c"))
    assert len(task.train) == 250 and task.label_names == ["0", "1"]


def test_missing_file_and_column_are_named(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = compose(["data=file", f"data.path={tmp_path / 'nope.csv'}"])
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        build_task_data(cfg.data, tokenizer, seed=0, cache_dir=str(tmp_path))
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_csv(path, index=False)
    cfg = compose(["data=file", f"data.path={path}", "data.label_column=target", "data.test_size=1"])
    with pytest.raises(KeyError, match=r"data\.label_column"):
        build_task_data(cfg.data, tokenizer, seed=0, cache_dir=str(tmp_path))


def test_a_node_trains_on_its_own_file_with_the_runs_label_list(tiny: list[str], tmp_path: Path) -> None:
    """`--node-config "partition-id=0 data-path=FILE"`: all of FILE, labels through data.labels, fresh cache."""
    from flwr.app import Context, RecordDict

    from fl.app.client_app import _partition, local_data_overrides
    from fl.app.workspace import get_workspace

    path = tmp_path / "site-a.csv"
    pd.DataFrame({"text": [f"site a says {i}" for i in range(40)], "label": ["positive"] * 40}).to_csv(path)
    run = [*tiny, "data.labels=[negative,neutral,positive]"]
    node = {"partition-id": 3, "data-path": str(path)}
    assert local_data_overrides(run, {"partition-id": 3}) == run  # no data-path: a partition of the pool
    ws = get_workspace(local_data_overrides(run, node))
    pid, data = _partition(Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}), ws)
    assert pid == 3 and len(data) == 40  # the whole file: nothing held out, no max_examples cut
    assert ws.task.label_names == ["negative", "neutral", "positive"] and ws.num_labels == 3  # same head everywhere
    assert {y for _, y in data} == {2}  # "positive" keeps id 2 although the file has one class
    # the file changes in place: the on-disk token cache (same config, same key otherwise) must not serve old rows
    cfg = ws.cfg
    pd.DataFrame({"text": [f"more {i}" for i in range(55)], "label": ["neutral"] * 55}).to_csv(path)
    task = build_task_data(cfg.data, ws.tokenizer, seed=int(cfg.seed), cache_dir=cfg.cache_dir)
    assert len(task.train) == 55 and {int(y) for y in task.train.labels} == {1}
    # a label the run's list does not have is named, with the fix
    pd.DataFrame({"text": ["x", "y"], "label": ["positive", "angry"]}).to_csv(path)
    with pytest.raises(ValueError, match=r"data\.labels=.*\['angry'\]"):
        build_task_data(cfg.data, ws.tokenizer, seed=int(cfg.seed), cache_dir=cfg.cache_dir)


def test_a_malformed_csv_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"fine",positive\n"also fine",negative\nbroken,row,with,extra\n')
    cfg = compose(["model=tiny", "data=file", f"data.path={bad}"])
    with pytest.raises(ValueError, match=r"bad\.csv.*line 4"):
        load_pool(cfg.data)
