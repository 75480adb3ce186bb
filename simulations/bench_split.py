"""Benchmark the physical-batch split in one run: physical batches by length and cut to their own longest
sequence (`clients.train.split_batch`) against in-order, uncut ones (the split before 2026-11-26), each
without DP and with DP-SGD (hooks), arms interleaved, on the default model at logical 128 = 8 × 16.

Usage::

    python -m simulations.bench_split [--steps 4] [--reps 2]
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import clients.train as train
from simulations import harness
from simulations.harness.timing import Timing, Trainer, alternate

SPLITS = {"by_length": train.split_batch, "in_order": train.in_order_split}


def main(argv: Sequence[str] | None = None) -> None:
    """Time every (split, DP or not) arm, alternating; print seconds per step and the DP ratio per split."""
    ap = harness.parser(__doc__)
    ap.add_argument("--steps", type=int, default=4, help="logical steps per arm and repetition")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions (arms reversed every other one)")
    args = harness.parse(ap, argv)
    t = Trainer(["train.batch_size=16"], batch=128, examples=6000, noise_seed=0)  # as bench_privacy's 128/16

    def run(arm: tuple[str, str | None], seed: int, steps: int) -> Timing:
        train.split_batch = SPLITS[arm[0]]  # the split local_train calls, swapped per arm
        return t.round(steps, seed, arm[1])

    arms = [(name, mode) for name in SPLITS for mode in (None, "hooks")]
    try:
        timed = alternate(arms, args.reps, lambda arm, rep: run(arm, rep, args.steps), warmup=lambda a: run(a, 99, 1))
    finally:
        train.split_batch = SPLITS["by_length"]
    mean = {f"{name}/{mode or 'non-DP'}": sum(x.per_step for x in xs) / len(xs) for (name, mode), xs in timed.items()}
    for name in SPLITS:
        print(
            f"{name}: non-DP {mean[f'{name}/non-DP']:.3f} s/step, hooks {mean[f'{name}/hooks']:.3f} s/step, "
            f"ratio {mean[f'{name}/hooks'] / mean[f'{name}/non-DP']:.3f}",
            flush=True,
        )
    print(json.dumps(mean))


if __name__ == "__main__":
    main()
