"""`fl-eval` / `python -m fl.app.eval`: score a run's exported adapter, or a base model, with lm-evaluation-harness.

    fl-eval RUN_DIR [--tasks fl_heldout_mc fl_heldout_gen mmlu ...]   # the run's adapter (and base delta)
    fl-eval RUN_DIR RUN_DIR ... [--skip-scored]                      # several runs (a sweep's cells), in turn
    fl-eval RUN_DIR --base-only                                       # the run's base model, zero-shot
    fl-eval --base model=smollm2 data.test_size=500 --out DIR         # a base model from Hydra overrides

The shipped tasks (`fl.app.eval.tasks`) read the run's held-out records (`fl.app.eval.records`), written to
``<dir>/eval/heldout.jsonl`` with the tasks' YAMLs in ``<dir>/eval/tasks`` (an lm-eval include path). Scores go to
``<dir>/eval.json`` (one entry per model scored: ``adapter``, ``base``), into ``summary.json`` under ``eval``, and
to the run's tracking backend (`fl.app.eval.track`); lm-eval's per-example outputs to
``<dir>/eval/<model>/samples_<task>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fl import constants as K
from fl.app.eval.harness import HarnessOptions, build_model, require_lm_eval, run_harness, task_metrics
from fl.app.eval.records import SHIPPED_TASKS, check_tasks, class_counts, heldout_records, write_records, write_tasks
from fl.app.eval.track import flat_scores, log_scores
from fl.config import to_yaml
from fl.models import load_tokenizer
from fl.outputs import read_metrics, write_atomic

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
EVAL_DIR = "eval"
TRACK_PREFIX = {"adapter": "eval", "base": "eval_base"}


def evaluate(
    cfg: DictConfig, out_dir: Path, *, adapter_dir: Path | None, opts: HarnessOptions, track: bool = True
) -> dict[str, Any]:
    """Score the model of `cfg` (with the adapter in `adapter_dir`, or the base alone) on `opts.tasks`.

    Writes ``eval.json`` (this model's entry replaces its previous one), ``summary.json``'s ``eval`` when the
    folder has a summary, and the tracking backend's scores when `track`; returns this model's entry.
    """
    version = require_lm_eval()
    which = "base" if adapter_dir is None else "adapter"
    work = out_dir / EVAL_DIR
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    held: dict[str, Any] = {}
    if any(t in SHIPPED_TASKS for t in opts.tasks):
        rows = heldout_records(cfg, tokenizer)
        check_tasks(list(opts.tasks), rows)
        opts = replace(opts, include_path=write_tasks(write_records(rows, work), work))
        held = {"heldout_records": len(rows), "heldout_classes": class_counts(rows)}
    t0 = time.perf_counter()
    results = run_harness(build_model(cfg, adapter_dir), tokenizer, opts)
    entry = {
        "model": which,
        "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
        "tasks": task_metrics(results),
        "lm_eval": version,
        "limit": opts.limit,
        **held,
        "seconds": time.perf_counter() - t0,
    }
    _write_samples(results.get("samples", {}), work / which)
    scores = _set_key(out_dir / EVAL_FILE, which, entry)
    if (out_dir / K.SUMMARY_FILE).is_file():
        _set_key(out_dir / K.SUMMARY_FILE, "eval", scores)
    if track:
        rows_done = read_metrics(out_dir) if (out_dir / K.METRICS_FILE).is_file() else []
        step = int(rows_done[-1]["round"]) if rows_done else 0
        where = log_scores(cfg, out_dir, flat_scores(TRACK_PREFIX[which], entry["tasks"]), step=step)
        if where:
            log.info("Scores logged to %s", where)
    return entry


def _set_key(path: Path, key: str, value: Any) -> dict[str, Any]:
    """Set one top-level key of a JSON object file (created if missing); return the whole object."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
    return data


def _write_samples(samples: dict[str, list[dict[str, Any]]], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for task, items in samples.items():
        lines = "".join(json.dumps(s, default=str, ensure_ascii=False) + "\n" for s in items)
        write_atomic(folder / f"samples_{task}.jsonl", lines)


def run_config(run_dir: Path) -> DictConfig:
    """The composed config a run wrote (``config.yaml``)."""
    path = run_dir / K.CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {K.CONFIG_FILE}; give a run folder that fl-sim or fl-deploy wrote.")
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg


def scored_already(run_dir: Path, tasks: Sequence[str], *, which: str = "adapter") -> bool:
    """Whether `run_dir`'s eval.json already holds `which`'s scores on every one of `tasks` (``--skip-scored``)."""
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return False
    done = json.loads(path.read_text()).get(which, {}).get("tasks", {})
    return all(t in done for t in tasks)


def main(argv: Sequence[str] | None = None) -> None:
    """The `fl-eval` command line (see the module docstring)."""
    from fl.app.cli import DEBUG_ENV, USER_ERRORS, exit_on_user_error, one_line, setup_logging
    from fl.runtime_env import set_quiet_env

    parser = argparse.ArgumentParser(
        prog="fl-eval",
        description="Score a run's exported adapter (or a base model) with EleutherAI's lm-evaluation-harness.",
    )
    parser.add_argument(
        "target", nargs="*", help="RUN_DIR (or several, scored in turn), or with --base: Hydra overrides"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(SHIPPED_TASKS),
        help=f"lm-eval task names (default: the shipped {' '.join(SHIPPED_TASKS)}; hub tasks need the hub)",
    )
    parser.add_argument("--base-only", action="store_true", help="score RUN_DIR's base model without its adapter")
    parser.add_argument("--base", action="store_true", help="score the base model that the overrides configure")
    parser.add_argument("--out", type=Path, help="with --base: the folder for eval.json (default outputs/eval-base)")
    parser.add_argument("--batch-size", type=int, help="examples per forward (default train.eval_batch_size)")
    parser.add_argument("--limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (hub tasks; the shipped ones are 0-shot)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default train.device)")
    parser.add_argument("--no-track", action="store_true", help="do not log the scores to the run's tracking backend")
    parser.add_argument(
        "--skip-scored", action="store_true", help="leave a RUN_DIR whose eval.json already has every task asked"
    )
    args = parser.parse_args(argv)
    try:
        require_lm_eval()
    except ImportError as e:
        parser.exit(2, f"fl-eval: error: {e}\n")
    set_quiet_env()
    setup_logging()

    def score(cfg: DictConfig, out_dir: Path, adapter: Path | None) -> dict[str, Any]:
        opts = HarnessOptions(
            tasks=tuple(args.tasks),
            batch_size=args.batch_size or int(cfg.train.eval_batch_size),
            limit=args.limit,
            device=args.device or str(cfg.train.device),
            precision=str(cfg.train.precision),
            num_fewshot=args.num_fewshot,
        )
        return evaluate(cfg, out_dir, adapter_dir=adapter, opts=opts, track=not args.no_track and not args.base)

    def show(entry: dict[str, Any], prefix: str = "") -> None:
        for task, metrics in entry["tasks"].items():
            items = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"{prefix}{task} {items}")

    if args.base:
        from fl.app.config import compose

        def base() -> dict[str, Any]:
            cfg, out_dir = compose(args.target), args.out or Path("outputs/eval-base")
            out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(out_dir / K.CONFIG_FILE, to_yaml(cfg))
            return score(cfg, out_dir, None)

        show(exit_on_user_error("fl-eval", base))
        return
    if not args.target:
        parser.exit(2, "fl-eval: error: give a RUN_DIR (or several), or --base with Hydra overrides.\n")
    runs = [Path(t) for t in args.target]
    which = "base" if args.base_only else "adapter"

    def one(run_dir: Path) -> dict[str, Any]:
        return score(run_config(run_dir), run_dir, None if args.base_only else run_dir / K.ADAPTER_DIR)

    # each run in turn (a sweep's cells): one that fails is named in one line and the others are still scored
    failed: list[str] = []
    for run_dir in runs:
        prefix = f"{run_dir}: " if len(runs) > 1 else ""
        if args.skip_scored and scored_already(run_dir, args.tasks, which=which):
            print(f"{run_dir}: already scored on {' '.join(args.tasks)} (--skip-scored)")
            continue
        try:
            show(one(run_dir), prefix=prefix)
        except USER_ERRORS as e:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            print(f"fl-eval: {prefix}error: {one_line(e)} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
            failed.append(str(run_dir))
    if failed and len(runs) > 1:
        parser.exit(2, f"fl-eval: {len(failed)} of {len(runs)} runs not scored: {' '.join(failed)}\n")
    if failed:
        sys.exit(2)
