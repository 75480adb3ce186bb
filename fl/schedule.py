"""The client learning rate of each round: a schedule across rounds, computed by the server.

As in Flower's FlowerTune apps (`cosine_annealing` in their server_app), the server computes the round's
rate and sends it in the round's ConfigRecord; clients use it instead of `strategy.lr`, which is the
peak. The rate depends on the absolute round and `sim.rounds` only, so a run resumed from its
checkpoint continues the same schedule (resuming with a larger `sim.rounds` stretches the cosine).
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def round_lr(
    server_round: int,
    *,
    peak: float,
    total_rounds: int,
    schedule: str = "constant",
    warmup_rounds: int = 0,
    lr_min: float = 0.0,
) -> float:
    """The client learning rate of round `server_round` (1-based).

    Parameters
    ----------
    server_round : int
        The absolute round, 1..total_rounds (values outside are clamped).
    peak : float
        `strategy.lr`: the rate after warm-up (constant) or at the top of the cosine.
    total_rounds : int
        `sim.rounds`.
    schedule : {"constant", "cosine"}
        ``constant``: `peak` after warm-up. ``cosine``: half a cosine from `peak` in round W+1 towards
        `lr_min`, reached one round after the last (so the last round still trains): with
        x = (round − W − 1) / (total_rounds − W), lr = lr_min + (peak − lr_min)·(1 + cos πx)/2.
    warmup_rounds : int
        W rounds of linear warm-up first: round r ≤ W gets lr_min + (peak − lr_min)·r/(W + 1).
    lr_min : float
        The floor (0 ≤ lr_min ≤ peak).

    Returns
    -------
    float
        The learning rate.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}.")
    r = min(max(int(server_round), 1), max(int(total_rounds), 1))
    w = max(int(warmup_rounds), 0)
    if r <= w:
        return lr_min + (peak - lr_min) * r / (w + 1)
    if schedule == "constant":
        return peak
    x = (r - w - 1) / max(int(total_rounds) - w, 1)
    return lr_min + (peak - lr_min) * 0.5 * (1.0 + math.cos(math.pi * x))
