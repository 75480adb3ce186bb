"""Benchmark the causal-LM task on SmolLM2-135M-Instruct (CPU): seconds per local step and uplink floats.

Usage::

    bash dev.sh python -m simulations.bench_causal [--steps 3] [--threads 1] [--out outputs/bench_causal.json]

For each method it builds the framework's model (adapters on all seven projections of every layer: q, k, v,
o, gate, up, down) and reports the floats a client sends per round, measured (the trainable tensors the
ClientApp puts in its reply) and from the formula (LoRA r·(d_in+d_out), FFA-LoRA r·d_out, Fed-SB r² per
projection), plus Fed-SB's one-off init-gradient upload (every adapted W0). It then times `local_train`
(batch 8, the preset's setting) for FedIT r=8, Fed-SB r=32 and FedIT r=8 under Opacus DP-SGD, after one
warm-up step, with `--threads` torch threads (one per simulated client on 2 cores).

``--head`` times instead what `logits_to_keep` saves (`fl.tasks.causal_lm.CausalLM.model_inputs`: vocabulary
logits only from the first position that predicts a response token): the server's evaluation of the held-out
split and a training step (forward + backward, batch 8), each with the full logits and with the kept ones,
alternated `--repeats` times in one process so that both see the same machine; it prints the ratios.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from fl.accel import autocast
from fl.adapters import trainable_state
from fl.app.workspace import get_workspace
from fl.tasks.base import Batch, Task
from fl.tasks.causal_lm import CausalLM
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


class FullLogits(CausalLM):
    """The causal-LM task as it was before `logits_to_keep`: vocabulary logits at every position."""

    def model_inputs(self, batch: Any) -> Batch:
        return Task.model_inputs(self, batch)


def head_seconds(overrides: list[str], *, repeats: int, precision: str) -> dict[str, Any]:
    """Seconds of one held-out evaluation and of one training step, full logits vs kept, alternated."""
    ws = get_workspace(overrides)
    kept, full = ws.task_def, FullLogits()
    split, pad, bs = ws.task.test, ws.pad_id, int(ws.cfg.train.eval_batch_size)
    assert split.prompt_lengths is not None  # a causal-LM split
    rows = [(split.input_ids[i], int(split.labels[i]), int(split.prompt_lengths[i])) for i in range(len(split))]
    batches = [kept.collate(rows[i : i + 8], pad) for i in range(0, 8 * repeats, 8)]  # unsorted, like training
    model = ws.model
    model.train()
    times: dict[str, list[float]] = {k: [] for k in ("eval_full", "eval_kept", "step_full", "step_kept")}
    metrics: dict[str, Any] = {}
    for r in range(repeats):
        for name, task in (("full", full), ("kept", kept)) if r % 2 == 0 else (("kept", kept), ("full", full)):
            t0 = time.perf_counter()
            with autocast(torch.device("cpu"), precision):  # this task's evaluate, not the registered one's
                metrics[name] = task.evaluate(model, split, batch_size=bs, pad_id=pad)
            times[f"eval_{name}"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with autocast(torch.device("cpu"), precision):
                loss = task.per_example_loss(model(**task.model_inputs(batches[r])), batches[r]).mean()
            loss.backward()
            times[f"step_{name}"].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    out: dict[str, Any] = {k: min(v) for k, v in times.items()}
    out["eval_ratio_kept_over_full"] = out["eval_kept"] / out["eval_full"]
    out["step_ratio_kept_over_full"] = out["step_kept"] / out["step_full"]
    out["records"], out["precision"], out["metrics"] = len(split), precision, metrics
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """The floats of every method, then (unless ``--skip-steps``) the timed steps; all of it into ``--out``."""
    ap = harness.parser(__doc__)
    ap.add_argument("--steps", type=int, default=3, help="timed local steps per setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per simulated client on 2 cores)")
    ap.add_argument("--out", default="outputs/bench_causal.json")
    ap.add_argument("--skip-steps", action="store_true", help="only the floats (no training)")
    ap.add_argument("--head", action="store_true", help="only the full-vs-kept logits timing (eval and a step)")
    ap.add_argument("--repeats", type=int, default=3, help="--head: alternations (the minimum of each is kept)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="--head: the forwards' precision")
    args = harness.parse(ap, argv)
    torch.set_num_threads(args.threads)
    if args.head:
        ov = ["+experiment=smollm2", "data.test_size=500", f"train.precision={args.precision}", "strategy=fedit"]
        result = head_seconds(ov, repeats=args.repeats, precision=args.precision)
        print(result, flush=True)
        harness.write_json(args.out, result)
        return
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
