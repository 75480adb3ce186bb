"""Benchmark the physical-batch split in one run: physical batches by length and cut to their own longest
sequence (`clients.train.split_batch`) against in-order, uncut ones (the split before 2026-11-26), each
without DP and with DP-SGD (hooks), arms interleaved, on the default model at logical 128 = 8 × 16.

Usage::

    python -m simulations.bench_split [--steps 4] [--reps 2]
"""

from __future__ import annotations

import argparse
import json

import clients.train as train
from fl.runtime_env import set_quiet_env
from simulations.bench_privacy import _trainer


def main() -> None:
    set_quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="logical steps per arm and repetition")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    splits = {"by_length": train.split_batch, "in_order": train.in_order_split}
    run = _trainer(["train.batch_size=16"], 128)
    for split in splits.values():  # warm-up
        train.split_batch = split
        run(1, 99, None)
        run(1, 99, "hooks")
    times: dict[str, list[float]] = {}
    for rep in range(args.reps):
        for name in splits if rep % 2 == 0 else list(splits)[::-1]:
            train.split_batch = splits[name]
            for mode in (None, "hooks") if rep % 2 == 0 else ("hooks", None):
                seconds, steps, _ = run(args.steps, rep, mode)
                times.setdefault(f"{name}/{mode or 'non-DP'}", []).append(seconds / steps)
    train.split_batch = splits["by_length"]
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    for name in splits:
        print(
            f"{name}: non-DP {mean[f'{name}/non-DP']:.3f} s/step, hooks {mean[f'{name}/hooks']:.3f} s/step, "
            f"ratio {mean[f'{name}/hooks'] / mean[f'{name}/non-DP']:.3f}",
            flush=True,
        )
    print(json.dumps(mean))


if __name__ == "__main__":
    main()
