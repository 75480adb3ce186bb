"""The cost of Opacus' `secure_mode` noise per DP step, measured in one run on a model (default: the tiny one).

``secure_mode`` changes two things: the noise's source (a CSPRNG from torchcsprng) and how it is drawn (the sum
of four Gaussians halved, plus one discarded draw, per step — the defence of Holohan & Braghin 2021 against the
floating-point attack of Jin et al. 2022). The second is measured here, with torch's generator: the DP optimizer's
``secure_mode`` flag (a public attribute) switched on and off between alternating chunks of the same round's
steps. The first needs torchcsprng; where it is missing the script says so and reports only the drawing cost.

Usage::

    python -m simulations.bench_secure_rng [--steps 20] [--chunks 4] [--model tiny]
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from privacy.engine import PrivateRound
from simulations import harness
from simulations.harness.timing import Trainer, alternate

TINY = [*harness.TINY, "data.max_examples=2000"]


def seconds_per_step(overrides: list[str], *, steps: int, chunks: int, batch: int) -> dict[str, float]:
    """Seconds per DP step with secure_mode's noise drawing off and on (alternating chunks, one process)."""
    t = Trainer(overrides, batch=batch)

    def run(secure: bool, seed: int) -> float:
        dp = t.dp("hooks")

        def wrap(m: Any, o: Any, loader: Any) -> PrivateRound:
            private = dp(m, o, loader)
            private.optimizer.secure_mode = secure  # Opacus' 2n-draw noise (n = 2); generator: torch's default
            return private

        return t.round(steps, seed, wrap=wrap).per_step

    times = alternate([False, True], chunks, run, warmup=lambda secure: run(secure, 99))
    plain, noisy = float(np.mean(times[False])), float(np.mean(times[True]))
    return {"plain_s_per_step": plain, "secure_s_per_step": noisy, "ratio": noisy / plain}


def main(argv: Sequence[str] | None = None) -> None:
    """Time both arms on the chosen model; print the JSON and the ratio."""
    ap = harness.parser(__doc__)
    harness.add_timing(ap, steps=20, chunks=4, steps_help="DP steps per chunk")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="tiny", help="tiny, or a model group name (e.g. minilm)")
    args = harness.parse(ap, argv)
    overrides = TINY if args.model == "tiny" else [f"model={args.model}"]
    t0 = time.perf_counter()
    out: dict[str, float | str] = {}
    out |= seconds_per_step(
        [*overrides, f"train.batch_size={args.batch}"], steps=args.steps, chunks=args.chunks, batch=args.batch
    )
    try:
        import torchcsprng  # noqa: F401

        out["csprng"] = "installed (its draws are not in this ratio)"
    except ImportError:
        out["csprng"] = "torchcsprng not installed: its generator's cost is not measured; secure_mode cannot run"
    out["model"], out["wall_s"] = args.model, time.perf_counter() - t0
    print(json.dumps(out), flush=True)
    print(f"secure_mode noise / default noise, seconds per DP step on {args.model}: {out['ratio']:.3f}", flush=True)


if __name__ == "__main__":
    main()
