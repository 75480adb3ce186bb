"""Client drift control (`drift=`): FedProx's proximal pull and SCAFFOLD's control variates on a client's
trained tensors.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127 (FedProx); Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020, https://arxiv.org/abs/1910.06378.
"""

from __future__ import annotations

import math
from typing import Any

DRIFTS = ("none", "fedprox", "scaffold")
"""`drift.name` values."""


def validate_drift(cfg: Any) -> None:
    """Check the `drift` group of a composed config; errors name the key and the fix."""
    d = cfg.drift
    if d.name not in DRIFTS:
        raise ValueError(f"drift.name={d.name!r} is invalid: use one of {', '.join(DRIFTS)}.")
    if not (math.isfinite(float(d.mu)) and float(d.mu) >= 0):
        raise ValueError(f"drift.mu={d.mu!r} is invalid: use a proximal weight μ >= 0 (e.g. 0.01).")
