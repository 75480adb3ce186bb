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
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from simulations import harness
from simulations.harness.timing import DP_MODES, Trainer, alternate, peak_rss_mib

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


MODES = tuple(DP_MODES)  # per_layer: hooks with privacy.clipping=per_layer


def trainer(overrides: list[str], logical: int) -> Trainer:
    """Rounds at logical batch `logical` on the first 6,000 training examples, seeded noise (the simulation's)."""
    return Trainer(overrides, batch=logical, examples=6000, noise_seed=0)


def step_time_ratio(
    steps: int, chunks: int, overrides: list[str], logical: int, modes: tuple[str, ...] = MODES
) -> dict[str, float]:
    """Seconds per logical step of non-DP and DP (each mode) local training on the same model and data.

    Modes share one process and model. Measured here: a ghost round leaves the process ~10% slower for later
    hooks rounds (cause not established), so time hooks alone (``--modes hooks``) for its ratio. Also per example:
    a Poisson batch has logical ± √logical examples, which moves a per-step ratio by a few percent over a short run.
    """
    t = trainer(overrides, logical)
    timed = alternate(
        [None, *modes],
        chunks,
        lambda mode, chunk: t.round(steps, chunk, mode),
        warmup=lambda mode: t.round(2, 99, mode),
    )
    secs = {mode or "plain": sum(x.seconds for x in xs) for mode, xs in timed.items()}
    counts = {mode or "plain": sum(x.steps for x in xs) for mode, xs in timed.items()}
    examples = {mode or "plain": sum(x.examples for x in xs) for mode, xs in timed.items()}
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
    timing = trainer(["train.batch_size=16"], logical).round(steps, 0, mode)
    return {"case": name, "peak_rss_mib": peak_rss_mib(), "steps": timing.steps, "s_per_step": timing.per_step}


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
    """Final accuracy of each strategy without DP and at each target ε."""
    out = []
    for strategy in strategies:
        for e in [None, *eps]:
            priv = ["privacy=off"] if e is None else ["privacy=dp", f"privacy.target_epsilon={e}"]
            run = harness.simulate([f"strategy={strategy}", *priv, *common], prefix="bench-dp-")
            out.append(
                {
                    "strategy": strategy,
                    "target_epsilon": e,
                    "final_acc": run.final["accuracy"],
                    "epsilon_max": max((r.get("epsilon_max") or 0.0) for r in run.rows),
                    "wall_s": run.wall_s,
                }
            )
            print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Step-time ratios, peak RSS (``--rss``) and accuracy per ε, as asked; ``--out``: all of it as JSON."""
    ap = harness.parser(__doc__)
    harness.add_timing(ap, steps=30, chunks=4, steps_help="examples per chunk ÷ 16 (steps at logical batch 16)")
    ap.add_argument("--eps", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    ap.add_argument("--strategies", nargs="*", default=["fedit", "ffa_lora", "lora_fair", "fed_sb"])
    harness.add_federation(ap, rounds=5, local_steps=10, clients=10, test_size=1000)
    harness.add_extra(ap)
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
    args = harness.parse(ap, argv)
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
        result["common"] = common = harness.federation(args)  # as recorded: constant rate, fp32
        result["accuracy"] = accuracy_table(args.strategies, args.eps, common)
    if args.out:
        harness.write_json(args.out, result)


if __name__ == "__main__":
    main()
