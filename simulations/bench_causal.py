"""Benchmark the causal-LM task on SmolLM2-135M-Instruct (CPU): seconds per local step and uplink floats.

Usage::

    bash dev.sh python -m simulations.bench_causal [--steps 3] [--threads 1] [--out outputs/bench_causal.json]

For each method it builds the framework's model (adapters on all seven projections of every layer: q, k, v,
o, gate, up, down) and reports the floats a client sends per round, measured (the trainable tensors the
ClientApp puts in its reply) and from the formula (LoRA r·(d_in+d_out), FFA-LoRA r·d_out, Fed-SB r² per
projection), plus Fed-SB's one-off init-gradient upload (every adapted W0). It then times `local_train`
(batch 8, the preset's setting) for FedIT r=8, Fed-SB r=32 and FedIT r=8 under Opacus DP-SGD, after one
warm-up step, with `--threads` torch threads (one per simulated client on 2 cores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fl.adapters import trainable_state
from fl.app.workspace import get_workspace
from fl.wire import num_floats
from simulations import harness
from simulations.harness.timing import Trainer

BASE = ["+experiment=smollm2", "train.batch_size=8", "train.precision=fp32"]  # the recorded step times are fp32
METHODS = {"fedit": 8, "ffa_lora": 8, "lora_fair": 8, "fed_sb": 32}


def projection_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every adapted projection of `model` (a PEFT model)."""
    return [
        (int(m.in_features), int(m.out_features))
        for n, m in model.named_modules()
        if n.endswith("_proj") and hasattr(m, "base_layer")
    ]


def formula(strategy: str, rank: int, shapes: list[tuple[int, int]]) -> int:
    """Uplink floats per client per round."""
    if strategy == "ffa_lora":
        return sum(rank * d_out for _, d_out in shapes)
    if strategy == "fed_sb":
        return len(shapes) * rank * rank
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes)


def seconds_per_step(overrides: list[str], *, steps: int, dp: bool) -> float:
    """Seconds per local step (batch 8, 400 examples) after one warm-up step, with or without DP-SGD (hooks)."""
    t = Trainer(overrides, batch=8, examples=400)
    mode = "hooks" if dp else None
    t.round(1, 98, mode)  # warm-up
    return t.round(steps, 99, mode).per_step


def main(argv: Sequence[str] | None = None) -> None:
    """The floats of every method, then (unless ``--skip-steps``) the timed steps; all of it into ``--out``."""
    ap = harness.parser(__doc__)
    ap.add_argument("--steps", type=int, default=3, help="timed local steps per setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per simulated client on 2 cores)")
    ap.add_argument("--out", default="outputs/bench_causal.json")
    ap.add_argument("--skip-steps", action="store_true", help="only the floats (no training)")
    args = harness.parse(ap, argv)
    torch.set_num_threads(args.threads)
    rows: dict[str, Any] = {"floats": {}, "seconds_per_step": {}, "threads": args.threads, "steps": args.steps}
    for strategy, rank in METHODS.items():
        ov = [*BASE, f"strategy={strategy}", f"strategy.rank={rank}"]
        ws = get_workspace(ov)
        shapes = projection_shapes(ws.model)
        rows["floats"][f"{strategy} r={rank}"] = {
            "projections": len(shapes),
            "formula": formula(strategy, rank, shapes),
            "measured": num_floats(trainable_state(ws.model)),
            **({"init_gradient_once": sum(a * b for a, b in shapes)} if strategy == "fed_sb" else {}),
        }
        print(strategy, rows["floats"][f"{strategy} r={rank}"], flush=True)
    for label, ov, dp in (
        []
        if args.skip_steps
        else [
            ("fedit r=8", [*BASE, "strategy=fedit"], False),
            ("fed_sb r=32", [*BASE, "strategy=fed_sb"], False),
            ("fedit r=8 + DP-SGD", [*BASE, "strategy=fedit"], True),
        ]
    ):
        rows["seconds_per_step"][label] = seconds_per_step(ov, steps=args.steps, dp=dp)
        print(label, rows["seconds_per_step"][label], flush=True)
    harness.write_json(args.out, rows)


if __name__ == "__main__":
    main()
