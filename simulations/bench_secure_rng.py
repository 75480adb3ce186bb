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

import argparse
import json
import time

import numpy as np

from clients.train import local_train
from fl.app.workspace import get_workspace
from fl.data import IndexedDataset
from fl.runtime_env import set_quiet_env
from privacy import ClientAccountant, make_private

TINY = ["model=tiny", "data.max_examples=2000", "data.test_size=100", "data.max_length=32", "train.precision=fp32"]


def seconds_per_step(overrides: list[str], *, steps: int, chunks: int, batch: int) -> dict[str, float]:
    """Seconds per DP step with secure_mode's noise drawing off and on (alternating chunks, one process)."""
    ws = get_workspace(overrides)
    data = IndexedDataset(ws.task.train, np.arange(len(ws.task.train)))
    acc = ClientAccountant("rdp")

    def run(secure: bool, seed: int) -> float:
        def wrap(m, o, loader):
            private = make_private(
                model=m,
                optimizer=o,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                accountant=acc,
                loss_fn=ws.task_def.per_example_loss,
            )
            private.optimizer.secure_mode = secure  # Opacus' 2n-draw noise (n = 2); generator: torch's default
            return private

        res = local_train(
            ws.model, data, steps=steps, batch_size=batch, lr=1e-3, weight_decay=0.0, pad_id=ws.pad_id, seed=seed,
            wrap=wrap,
        )  # fmt: skip
        return res.seconds / max(res.steps, 1)

    run(False, 99), run(True, 99)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "secure": []}
    for chunk in range(chunks):
        for secure in (False, True) if chunk % 2 == 0 else (True, False):
            times["secure" if secure else "plain"].append(run(secure, chunk))
    plain, noisy = float(np.mean(times["plain"])), float(np.mean(times["secure"]))
    return {"plain_s_per_step": plain, "secure_s_per_step": noisy, "ratio": noisy / plain}


def main() -> None:
    set_quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default="tiny", help="tiny, or a model group name (e.g. minilm)")
    args = ap.parse_args()
    overrides = TINY if args.model == "tiny" else [f"model={args.model}"]
    t0 = time.perf_counter()
    out: dict[str, float | str] = {}
    out |= seconds_per_step([*overrides, f"train.batch_size={args.batch}"], steps=args.steps, chunks=args.chunks,
                           batch=args.batch)  # fmt: skip
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
