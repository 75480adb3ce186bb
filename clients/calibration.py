"""FedLC's logit calibration (`train.fedlc_tau`): each client's cross-entropy on logits shifted by its own label
counts, so that label skew stops pulling the shared classifier towards each client's frequent classes.

Zhang, Li, Li, Xu, Wu, Ding, Wu, "Federated Learning with Label Distribution Skew via Logits Calibration", ICML
2022, https://proceedings.mlr.press/v162/zhang22p.html. Client k trains on

    ℓ(x, y) = −log softmax(z(x) − τ·n_k^{−1/4})_y,

where z(x) are the class logits and n_k,c the number of examples of class c this client holds. A rare local class
has its logit lowered more, so the client must raise it further to fit the examples it has: the pull of the
frequent classes on the shared head and adapter is offset by the client's own counts, which stay on the client.
Evaluation and the server use z as it is. The softmax runs over every class, as in the public implementations
(PFLlib's and FL-bench's `logit_calibrated_loss`); a class the client does not hold gets a count of 1e-8 (as
theirs), a shift of 100·τ that all but removes it from this client's softmax. τ = 0 is plain cross-entropy.

Written here because no library we use ships it: Flower's FedLC baseline (baselines/fedlc) trains plain
cross-entropy in the version read, and FedLC is a client-side loss, not a strategy.

Privacy: under sample-level DP-SGD one example's calibrated loss depends on the counts, i.e. on the client's
other examples, so the per-example sensitivity DP-SGD's accounting assumes does not hold: `validate_calibration`
refuses the pairing. Client-level DP (`privacy=client`) bounds a client's whole update and composes with it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fl.checks import require
from fl.data import IndexedDataset
from fl.tasks import get_task
from fl.tasks.base import Task
from privacy.engine import ExampleLoss

ABSENT_COUNT = 1e-8
"""The count a class the client does not hold is given (the public implementations' choice)."""


def fedlc_shift(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """τ·n_c^{−1/4} per class, float32 (a zero count as `ABSENT_COUNT`)."""
    return tau * counts.float().clamp_min(ABSENT_COUNT).pow(-0.25)


def class_counts(dataset: IndexedDataset, num_classes: int) -> torch.Tensor:
    """How many of the client's examples carry each class (examples without a class, label −1, not counted)."""
    labels = dataset.split.labels[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return torch.bincount(labels[labels >= 0], minlength=num_classes)[:num_classes]


def calibrated_loss(task: Task, dataset: IndexedDataset, num_classes: int, tau: float) -> ExampleLoss | None:
    """The client's FedLC loss for this partition, or None at τ = 0 (the task's own loss)."""
    if tau == 0:
        return None
    return task.calibrated_loss(fedlc_shift(class_counts(dataset, num_classes), tau))


def validate_calibration(cfg: Any) -> None:
    """Check `train.fedlc_tau` against the task and the privacy settings (ValueError naming the key)."""
    tau = cfg.train.fedlc_tau
    require(math.isfinite(float(tau)) and tau >= 0, "train.fedlc_tau", tau, "use 0 (off) or a τ > 0, e.g. 1.0.")
    if tau == 0:
        return
    require(
        get_task(str(cfg.model.task)).logit_calibration,
        "train.fedlc_tau",
        tau,
        f"FedLC calibrates class logits, and model.task={cfg.model.task} has none: use 0, or a classification task.",
    )
    require(
        not bool(cfg.privacy.enabled),
        "train.fedlc_tau",
        tau,
        "under sample-level DP-SGD (privacy.enabled) one example's calibrated loss depends on the client's label "
        "counts, so DP-SGD's per-example bound does not hold: use 0, or client-level DP (privacy=client).",
    )
