"""A run's held-out records as lm-eval data: ``heldout.jsonl`` and the shipped task YAMLs pointed at it.

The records are the run's own test split (`data.test_size` of the seeded shuffle, `fl.data.split_order`), rendered
exactly as the causal-LM task renders them: the chat template over the system and user turns with the
template's generation prompt (`fl.tasks.instructions.tokenize_conversations`), records whose prompt fills
`data.max_length` dropped as the run dropped them. Each line holds

- ``prompt``: that rendering (the context lm-eval scores or generates after),
- ``response``: the assistant's turn (the generation task's exact-match target),
- ``choices`` and ``label``: the class words and the record's index among them, when every response is its
  record's class word (the tweets); only then does the multiple-choice task apply.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from fl.data import label_ids, split_order
from fl.outputs import write_atomic
from fl.tasks import get_task
from fl.tasks.instructions import Records, load_records, tokenize_conversations

RECORDS_FILE = "heldout.jsonl"
TASKS_DIR = "tasks"  # under the evaluation folder: the shipped YAMLs with data_files filled in
MC_TASK = "fl_heldout_mc"
GEN_TASK = "fl_heldout_gen"
SHIPPED_TASKS = (MC_TASK, GEN_TASK)
NEEDS_CHOICES = {MC_TASK}


def heldout_records(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """The run's held-out records (see the module docstring), in the order the run scored them.

    Checked against the run's own tokenised test split (`Task.build_data`, cached on disk by the run): the same
    number of records and, token for token, the same prompts; a mismatch raises ValueError.
    """
    if str(cfg.model.task) != "causal_lm":
        raise ValueError(
            f"fl-eval scores causal language models; this run's model.task is {cfg.model.task!r}. "
            "A classifier's held-out accuracy is in its metrics.jsonl."
        )
    data_cfg, seed = cfg.data, int(cfg.seed)
    rec = _records(OmegaConf.to_yaml(data_cfg))
    test_idx, _ = split_order(len(rec.conversations), data_cfg, seed=seed)
    convs = [rec.conversations[i] for i in test_idx]
    ids, lengths, kept = tokenize_conversations(convs, tokenizer, max_length=int(data_cfg.max_length))
    classes, names = (None, []) if rec.classes is None else label_ids(rec.classes, data_cfg)
    test = get_task("causal_lm").build_data(data_cfg, tokenizer, seed=seed, cache_dir=cfg.cache_dir).test
    words = test.label_token_ids is not None  # the run scored label words (every response is its class word)
    assert test.prompt_lengths is not None
    if len(kept) != len(test) or any(
        ids[j][:p] != test.input_ids[j][: int(test.prompt_lengths[j])].tolist() for j, p in enumerate(lengths)
    ):
        raise ValueError(
            "The held-out records rendered for lm-eval differ from the run's own test split; the data source or "
            f"the tokenizer changed since the run (data.source={data_cfg.source})."
        )
    out = []
    for j, k in enumerate(kept):
        conv = convs[k]
        prompt = tokenizer.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        row: dict[str, Any] = {"index": int(test_idx[k]), "prompt": prompt, "response": conv[-1]["content"]}
        if words:
            assert classes is not None
            row.update(choices=list(names), label=int(classes[test_idx[k]]))
            if int(test.labels[j]) != row["label"]:
                raise ValueError(f"Held-out record {j}: class {row['label']} here, {int(test.labels[j])} in the run.")
        out.append(row)
    return out


@functools.lru_cache(maxsize=2)
def _records(data_yaml: str) -> Records:
    """`load_records` of a data config (as YAML), kept for the process: scoring the adapter and then the base
    reads the pool once (the tweets: ~4.5 s of CPU each time)."""
    data_cfg = OmegaConf.create(data_yaml)
    assert isinstance(data_cfg, DictConfig)
    return load_records(data_cfg)


def write_records(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """``<out_dir>/heldout.jsonl``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RECORDS_FILE
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def write_tasks(records: Path, out_dir: Path) -> Path:
    """Copy the shipped task YAMLs into ``<out_dir>/tasks`` reading `records` (an absolute path); return the folder.

    The folder is an lm-eval include path: ``lm_eval --include_path <out_dir>/tasks --tasks fl_heldout_mc`` reads
    the same records with plain lm-eval.
    """
    folder = out_dir / TASKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_TASKS:
        spec = yaml.safe_load(template(name))
        spec["dataset_kwargs"]["data_files"] = {spec["test_split"]: str(records.resolve())}
        write_atomic(folder / f"{name}.yaml", yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return folder


def template(name: str) -> str:
    """The text of a shipped task YAML (package data of `fl.app.eval.tasks`)."""
    return resources.files("fl.app.eval.tasks").joinpath(f"{name}.yaml").read_text()


def check_tasks(tasks: list[str], rows: list[dict[str, Any]]) -> None:
    """Refuse a shipped multiple-choice task when the records have no class words (say why)."""
    if any(t in NEEDS_CHOICES for t in tasks) and not all("choices" in r for r in rows):
        raise ValueError(
            f"{MC_TASK} needs records whose response is their class word (data.label_column and every response "
            f"one of the class words, as the tweets); this run's records are free text: use {GEN_TASK}."
        )


def class_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Held-out records per class word (for eval.json), empty without classes."""
    if not rows or "choices" not in rows[0]:
        return {}
    counts = np.bincount([r["label"] for r in rows], minlength=len(rows[0]["choices"]))
    return {w: int(c) for w, c in zip(rows[0]["choices"], counts, strict=True)}
