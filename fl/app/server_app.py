"""The Flower ServerApp: build the model and the method's strategy, run the rounds, write outputs.

`app` reads the overrides from the run config (``flwr run . --run-config "overrides='...'"``);
`make_server_app(overrides)` binds them for the in-process Simulation Runtime (`fl-sim`). Both call
`run_server`, which composes the config with `fl.config.compose`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from clients.evaluate import evaluate
from fl import constants as K
from fl.adapters import export_peft, fixed_state, load_tensors, trainable_state
from fl.app.config import compose, split_overrides
from fl.app.console import write_failure
from fl.app.progress import ProgressGrid
from fl.app.relay import run_progress
from fl.app.tracking import flat_params, make_tracker, numeric_metrics, plot_history
from fl.app.workspace import Workspace, get_workspace, server_init_gradient
from fl.base_delta import apply_base_delta, save_base_delta
from fl.checkpoint import Checkpoint
from fl.data import TokenizedSplit, client_partition
from fl.outputs import RunOutputs, best_round, write_atomic
from fl.wire import from_record, to_record
from privacy import client_plan
from privacy.client_level import plan_client_level
from strategies import get_strategy
from strategies.client_dp import client_dp_wrapper

log = logging.getLogger(__name__)


def default_run_dir() -> Path:
    """outputs/<date>/<time>, like Hydra's default run dir."""
    now = datetime.now()
    return Path("outputs") / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")


def check_server_config(cfg: DictConfig) -> None:
    """What the server needs of the config beyond its schema (fl-sim checks it before any process starts)."""
    if cfg.data.test_size < 1:
        raise ValueError("data.test_size=0: the server evaluates on a held-out split; set data.test_size >= 1.")


def run_server(grid: Grid, overrides: list[str]) -> Path:
    """Run one federated training job (or resume one) and write its run folder. Returns the folder."""
    t_start = time.perf_counter()
    check_server_config(compose(list(overrides)))
    ws = get_workspace(overrides)
    cfg = ws.cfg
    base_overrides = [o for o in overrides if not o.startswith("resume=")]
    ckpt = Checkpoint.load(cfg.resume) if cfg.resume else None
    out = RunOutputs(cfg.run_dir or default_run_dir())
    out.write_config(cfg)
    strategy = get_strategy(cfg.strategy.name).from_config(
        cfg, overrides=list(overrides), fixed=fixed_state(ws.model), server_gradient=lambda: server_init_gradient(ws)
    )
    rounds = int(cfg.sim.rounds)
    history: list[dict[str, Any]] = []
    initial = to_record(trainable_state(ws.model))
    wall_before = 0.0
    if ckpt is not None:
        strategy.load_state_dict(ckpt.strategy_state)
        strategy.round_offset = ckpt.round
        initial = to_record(ckpt.arrays)
        history = list(ckpt.history)
        wall_before = float(history[-1]["wall_seconds"])
        log.info("Resuming %s after round %d of %d", out.dir, ckpt.round, rounds)
    out.rewrite_metrics(history)
    tracker = make_tracker(cfg, out.dir)
    tracker.log_params(flat_params(cfg))
    for row in history:  # a resumed run's earlier rounds
        tracker.log_round(int(row["round"]), numeric_metrics(row))
    progress = run_progress(
        rounds=rounds,
        steps_per_client=None if ws.privacy.local_epochs is not None else ws.privacy.local_steps,
        start_round=strategy.round_offset,
        log_level=str(cfg.log_level),
    )
    test_split, round_split = ws.task.test, round_eval_split(ws.task.test, cfg.sim.round_eval_size, int(cfg.seed))
    if ws.privacy.enabled:
        log_privacy_plan(ws, out)
    runner: Any = strategy  # what runs the rounds: the strategy, or a DP wrapper around it
    if ws.privacy.client.enabled:
        plan = plan_client_level(cfg)
        log.info("%s", plan.describe())
        write_atomic(out.dir / "client_dp_plan.json", json.dumps(asdict(plan), indent=2) + "\n")
        runner = client_dp_wrapper(
            strategy,
            clipping=plan.clipping,
            noise_multiplier=plan.noise_multiplier,
            clip_norm=plan.clip_norm,
            num_sampled_clients=plan.sampled,
            epsilon_of=plan.epsilon,
        )
    cumulative = {
        "bytes_up": int(history[-1]["cum_bytes_up"]) if history else 0,
        "bytes_down": int(history[-1]["cum_bytes_down"]) if history else 0,
    }

    def central_evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_round = flower_round + strategy.round_offset
        if history and history[-1]["round"] == server_round:  # resumed: this round is already recorded
            return MetricRecord({"accuracy": history[-1]["accuracy"], "loss": history[-1]["loss"]})
        t_eval = time.perf_counter()
        load_tensors(ws.model, strategy.materialize(strategy.scored(server_round, arrays)))
        apply_base_delta(ws.model, strategy.base_delta())
        split = test_split if server_round >= rounds else round_split  # the last round scores all of it
        loss, acc = evaluate(
            ws.model,
            split,
            batch_size=int(cfg.train.eval_batch_size),
            pad_id=ws.pad_id,
            precision=str(cfg.train.precision),
        )
        row: dict[str, Any] = {"round": server_round, "accuracy": acc, "loss": loss}
        if ws.task.val is not None:  # data.val_size: the split every choice reads (fl.data.val_order)
            row[K.VAL_LOSS], row[K.VAL_ACCURACY] = evaluate(
                ws.model,
                ws.task.val,
                batch_size=int(cfg.train.eval_batch_size),
                pad_id=ws.pad_id,
                precision=str(cfg.train.precision),
            )
        if strategy.average.active:  # server_opt.average_from: how many rounds' globals the scored model averages
            row["averaged_rounds"] = strategy.average.count
        if round_split is not test_split:  # sim.round_eval_size: say which rounds scored a subset
            row["eval_examples"] = len(split)
        st = strategy.stats.get(server_round)
        if st is not None:
            cumulative["bytes_up"] += st.bytes_up
            cumulative["bytes_down"] += st.bytes_down
            row.update(st.row())
        row.update(
            eval_seconds=time.perf_counter() - t_eval,
            cum_bytes_up=cumulative["bytes_up"],
            cum_bytes_down=cumulative["bytes_down"],
            wall_seconds=wall_before + time.perf_counter() - t_start,
        )
        out.append_metrics(row)
        history.append(row)
        Checkpoint(server_round, from_record(arrays), strategy.state_dict(), history, base_overrides).save(out.dir)
        tracker.log_round(server_round, numeric_metrics(row))
        if log.isEnabledFor(logging.INFO):
            progress.round_done(row)
        return MetricRecord({"accuracy": acc, "loss": loss})

    final = initial
    try:
        if rounds > strategy.round_offset:
            result = runner.start(
                ProgressGrid(grid, progress),
                initial,
                num_rounds=rounds - strategy.round_offset,
                timeout=float(cfg.sim.timeout),
                evaluate_fn=central_evaluate,
            )
            final = result.arrays if result.arrays is not None and len(result.arrays) else from_history(history, out)
    except BaseException:
        progress.close()
        tracker.finish("FAILED")
        raise
    try:
        final = strategy.exported(final)  # server_opt.average_from: the mean of the globals, as last scored
        load_tensors(ws.model, strategy.materialize(final))
        apply_base_delta(ws.model, strategy.base_delta())
        export_peft(ws.model, kind=ws.kind, base=export_base(ws), out_dir=out.adapter_dir)  # type: ignore[arg-type]
        if strategy.base_delta():  # FedEx-LoRA: the folded W0 change travels with the adapter
            save_base_delta(strategy.base_delta(), out.adapter_dir)
        last = history[-1]
        out.write_summary(
            {
                "strategy": cfg.strategy.name,
                "rounds": rounds,
                "num_clients": int(cfg.sim.num_clients),
                "final_accuracy": last["accuracy"],
                **best_round(history),
                "final_loss": last["loss"],
                "cum_bytes_up": last["cum_bytes_up"],
                "cum_bytes_down": last["cum_bytes_down"],
                "wall_seconds": wall_before + time.perf_counter() - t_start,
                "client_seconds": sum(r.get("client_seconds", 0.0) for r in history),
                "failed_replies": sum(r.get("failed", 0) for r in history),
                "rejected_replies": sum(r.get("rejected", 0) for r in history),
                "label_names": ws.task.label_names,
                "adapter_dir": str(out.adapter_dir),
                "resumed_from_round": ckpt.round if ckpt is not None else None,
            }
        )
        if cfg.tracking.backend != "none" and cfg.tracking.artifacts:
            tracker.log_artifacts(out.adapter_dir, plot_history(history, out.dir))
        tracker.finish()
        log.info("Run finished: outputs in %s", out.dir.resolve())
    finally:
        progress.close()  # fl-sim waits for this: the adapter, summary and tracking are written
    return out.dir


def export_base(ws: Workspace) -> torch.nn.Module | None:
    """The base `export_peft` builds a plain LoRA on (Fed-SB's kind only; the others export `ws.model` itself).

    A copy of the run's model with its adapter layers taken out, not a second load of the base from disk: the
    ServerApp loads the model once. Its W0 may hold a folded base delta, which is harmless here: a PEFT adapter
    folder keeps only the adapter's tensors and the trained heads, never W0.
    """
    if ws.kind != "fedsb":
        return None
    return copy.deepcopy(ws.model).unload()


def round_eval_split(test: TokenizedSplit, size: int | None, seed: int) -> TokenizedSplit:
    """What rounds before the last score (`sim.round_eval_size`): a seeded subset of the held-out split, the
    same every round (so rounds compare), or all of it."""
    if size is None or size >= len(test):
        return test
    return test.subset(np.sort(np.random.default_rng(seed).permutation(len(test))[: int(size)]))


def log_privacy_plan(ws: Workspace, out: RunOutputs) -> None:
    """Show every client's DP plan up front (σ, q, steps, planned (ε, δ)); also in privacy_plan.json."""
    cfg = ws.cfg
    n = int(cfg.sim.num_clients)
    plans = []
    for pid in range(n):
        size = len(client_partition(ws.task, cfg.data, pid=pid, num_partitions=n, seed=int(cfg.seed)))
        plans.append({"partition": pid, "num_examples": size, **asdict(client_plan(ws.privacy, size))})
    sigmas = [p["noise_multiplier"] for p in plans]
    log.info("%s", client_plan(ws.privacy, plans[0]["num_examples"]).describe() + " (client 0)")
    log.info(
        "DP plans of %d clients: noise multiplier %.3f..%.3f, sample rate %.4g..%.4g, target ε=%s",
        n,
        min(sigmas),
        max(sigmas),
        min(p["sample_rate"] for p in plans),
        max(p["sample_rate"] for p in plans),
        ws.privacy.target_epsilon,
    )
    write_atomic(out.dir / "privacy_plan.json", json.dumps(plans, indent=2) + "\n")


def from_history(history: list[dict[str, Any]], out: RunOutputs) -> ArrayRecord:
    """The last checkpointed global arrays (when no round of this session aggregated anything)."""
    return to_record(Checkpoint.load(out.dir).arrays)


def make_server_app(overrides: list[str] | None = None) -> ServerApp:
    """A ServerApp bound to `overrides`, or reading them from the run config when None.

    Any exception of the run is written to `<run folder>/error.log` (its one line, then the traceback) before
    Flower sees it: fl-sim prints that line, and the folder keeps what was written so far (metrics, checkpoint).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        ov = overrides if overrides is not None else split_overrides(str(context.run_config.get("overrides", "")))
        if compose(list(ov)).run_dir is None:  # fix the folder now, so a failure is recorded where the run wrote
            ov = [*ov, f"run_dir={default_run_dir()}"]
        try:
            run_server(grid, ov)
        except Exception as e:
            try:
                write_failure(compose(list(ov)).run_dir, e)
            except Exception:  # the run's own exception matters more than its record
                log.exception("Could not write the run's error.log")
            raise

    return server_app


app = make_server_app()
