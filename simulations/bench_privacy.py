"""Benchmark client-side DP-SGD, in one run: DP step time ÷ non-DP step time inside the framework (hooks and
ghost clipping, at the same logical batch), peak RSS of a client at a large logical batch, and final accuracy
per strategy at several ε and without DP.

Usage::

    python -m simulations.bench_privacy [--steps 30] [--chunks 4] [--settings 16/16 128/16]
        [--modes hooks ghost per_layer] [--skip-accuracy] [--rss] [--eps 1 3 8]
        [--strategies fedit ffa_lora fed_sb] [--rounds 5] [--local-steps 10]

The step-time ratio alternates DP and non-DP chunks of `local_train` on the default model (MiniLM, LoRA
r=8 on every encoder linear layer) at the same logical and physical batch; DP uses Poisson sampling (expected
batch = the logical one). Goal ≤ 1.10. ``--rss`` runs each client setting in a fresh process and reports its
peak resident memory (goal: DP at logical batch 512, physical 16, ≤ 2× the non-DP client's).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from clients.train import local_train
from fl.app.workspace import get_workspace
from fl.data import IndexedDataset
from fl.outputs import read_metrics
from fl.runtime_env import set_quiet_env
from privacy import ClientAccountant, make_private

# (name, overrides, logical batch): the default adapter (LoRA on every encoder linear layer) at the default
# batch, and at a DP-sized logical batch made of physical batches of 16.
DEFAULT_SETTINGS = ("16/16", "128/16")


def setting(spec: str) -> tuple[str, list[str], int]:
    """``"L/P"``: logical batch L made of physical batches of P (name, overrides, logical batch)."""
    try:
        logical, physical = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--settings {spec!r}: write logical/physical batch sizes, e.g. 128/16") from None
    if logical < 1 or physical < 1 or logical % physical:
        raise ValueError(f"--settings {spec}: both sizes >= 1, the logical batch a multiple of the physical one")
    name = (
        f"all-linear, batch {logical}"
        if logical == physical
        else f"all-linear, logical {logical} = {logical // physical} x {physical}"
    )
    return name, [f"train.batch_size={physical}"], logical


MODES = ("hooks", "ghost", "per_layer")  # per_layer: hooks with privacy.clipping=per_layer


def _trainer(overrides: list[str], logical: int):
    ws = get_workspace(overrides)
    data = IndexedDataset(ws.task.train, np.arange(min(len(ws.task.train), 6000)))
    acc = ClientAccountant("rdp")

    def run(steps: int, seed: int, mode: str | None) -> tuple[float, int, int]:
        """(seconds, logical steps, examples through the model) of one local round."""

        def wrap(m, o, loader):
            return make_private(
                model=m,
                optimizer=o,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                accountant=acc,
                loss_fn=ws.task_def.per_example_loss,
                noise_seed=0,
                grad_sample_mode="hooks" if mode in (None, "per_layer") else mode,
                clipping="per_layer" if mode == "per_layer" else "flat",
            )

        res = local_train(
            ws.model,
            data,
            steps=steps,
            batch_size=logical,
            physical_batch_size=int(ws.cfg.train.batch_size),
            lr=1e-3,
            weight_decay=0.0,
            pad_id=ws.pad_id,
            seed=seed,
            wrap=wrap if mode else None,
        )
        return res.seconds, res.steps, res.examples_seen

    return run


def step_time_ratio(
    steps: int, chunks: int, overrides: list[str], logical: int, modes: tuple[str, ...] = MODES
) -> dict[str, float]:
    """Seconds per logical step of non-DP and DP (each mode) local training on the same model and data.

    Modes share one process and model. Measured here: a ghost round leaves the process ~10% slower for later
    hooks rounds (cause not established), so time hooks alone (``--modes hooks``) for its ratio. Also per example:
    a Poisson batch has logical ± √logical examples, which moves a per-step ratio by a few percent over a short run.
    """
    run = _trainer(overrides, logical)
    for mode in (None, *modes):  # warm-up
        run(2, 99, mode)
    secs = {m: 0.0 for m in ("plain", *modes)}
    counts = {m: 0 for m in secs}
    examples = {m: 0 for m in secs}
    order: list[str | None] = [None, *modes]
    for chunk in range(chunks):
        for mode in order if chunk % 2 == 0 else order[::-1]:
            s, n, e = run(steps, chunk, mode)
            secs[mode or "plain"] += s
            counts[mode or "plain"] += n
            examples[mode or "plain"] += e
    per_step = {m: secs[m] / counts[m] for m in secs}
    per_example = {m: secs[m] / examples[m] for m in secs}
    out = {f"{m}_s_per_step": v for m, v in per_step.items()}
    out.update({f"{m}_examples_per_step": examples[m] / counts[m] for m in secs})
    out.update({f"ratio_{m}": per_step[m] / per_step["plain"] for m in modes})
    out.update({f"ratio_{m}_per_example": per_example[m] / per_example["plain"] for m in modes})
    return out


RSS_CASES: dict[str, tuple[int, str | None]] = {
    "non-DP, batch 16": (16, None),
    "DP hooks, logical 512 / physical 16": (512, "hooks"),
    "DP ghost, logical 512 / physical 16": (512, "ghost"),
}


def rss_case(name: str, steps: int) -> dict[str, Any]:
    """Run one client setting for `steps` logical steps in this process; its peak RSS in MiB."""
    logical, mode = RSS_CASES[name]
    run = _trainer(["train.batch_size=16"], logical)
    seconds, taken, _ = run(steps, 0, mode)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"case": name, "peak_rss_mib": peak, "steps": taken, "s_per_step": seconds / max(taken, 1)}


def rss_table(steps: int) -> list[dict[str, Any]]:
    """Each RSS case in a fresh Python process (peak RSS is per process)."""
    rows = []
    for name in RSS_CASES:
        cmd = [sys.executable, "-m", "simulations.bench_privacy", "--rss-case", name, "--rss-steps", str(steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(out, flush=True)
    base = rows[0]["peak_rss_mib"]
    for row in rows:
        row["vs_non_dp"] = row["peak_rss_mib"] / base
    return rows


def accuracy_table(strategies: list[str], eps: list[float], common: list[str]) -> list[dict[str, Any]]:
    from fl.app.simulation import run_simulation

    out = []
    for strategy in strategies:
        for e in [None, *eps]:
            run_dir = Path(tempfile.mkdtemp(prefix="bench-dp-")) / "run"
            priv = ["privacy=off"] if e is None else ["privacy=dp", f"privacy.target_epsilon={e}"]
            t0 = time.perf_counter()
            run_simulation([f"strategy={strategy}", *priv, *common, f"run_dir={run_dir}"])
            rows = read_metrics(run_dir)
            out.append(
                {
                    "strategy": strategy,
                    "target_epsilon": e,
                    "final_acc": rows[-1]["accuracy"],
                    "epsilon_max": max((r.get("epsilon_max") or 0.0) for r in rows),
                    "wall_s": time.perf_counter() - t0,
                }
            )
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    set_quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--eps", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    ap.add_argument("--strategies", nargs="*", default=["fedit", "ffa_lora", "lora_fair", "fed_sb"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument(
        "--settings", nargs="*", default=list(DEFAULT_SETTINGS), help="step-time settings, logical/physical"
    )
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES, help="DP modes to time")
    ap.add_argument("--skip-steps", action="store_true", help="skip the step-time ratios")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--rss", action="store_true", help="measure peak RSS per client setting")
    ap.add_argument("--rss-steps", type=int, default=3)
    ap.add_argument("--rss-case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.rss_case:
        print(json.dumps(rss_case(args.rss_case, args.rss_steps)), flush=True)
        return
    result: dict[str, Any] = {"step_time": {}}
    if args.rss:
        result["rss"] = rss_table(args.rss_steps)
    for name, overrides, logical in [setting(x) for x in args.settings] if not args.skip_steps else []:
        steps = max(6, args.steps * 16 // logical)  # the same examples per chunk at every logical batch
        modes = tuple(args.modes)
        r = result["step_time"][name] = step_time_ratio(steps, args.chunks, overrides, logical, modes)
        ratios = ", ".join(
            f"{m} {r[f'ratio_{m}']:.3f} ({r[f'{m}_s_per_step']:.3f} s, {r[f'{m}_examples_per_step']:.1f} examples; "
            f"per example {r[f'ratio_{m}_per_example']:.3f})"
            for m in modes
        )
        print(
            f"DP / non-DP seconds per step, {name}: {ratios} vs {r['plain_s_per_step']:.3f} s non-DP (goal <= 1.10)",
            flush=True,
        )
    if not args.skip_accuracy:
        common = [
            f"sim.num_clients={args.clients}",
            f"sim.rounds={args.rounds}",
            f"train.local_steps={args.local_steps}",
            "data.partitioner=dirichlet",
            "data.alpha=0.5",
            f"data.test_size={args.test_size}",
            "train.lr_schedule=constant",  # as recorded: constant rate, fp32
            "train.precision=fp32",
        ]
        result["accuracy"] = accuracy_table(args.strategies, args.eps, common)
        result["common"] = common
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
