"""Client drift control (`drift=`): FedProx's proximal pull and SCAFFOLD's control variates on a client's
trained tensors.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127 (FedProx); Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020, https://arxiv.org/abs/1910.06378.

Both act through hooks on the client's *inner* optimiser (AdamW or SGD, `clients.optim`), which
`clients.train.local_train` attaches for one round. Under DP-SGD, Opacus' `DPOptimizer` clips every per-example
gradient, sums, adds the Gaussian noise and scales, and only then calls the inner optimiser's ``step``: a hook there
sees the released (noised) gradient, and what it adds is a function of that release, of the tensors the client was
sent and of the control variates — never of an example. It is post-processing and costs no ε; the accountant is
charged by the DP optimiser exactly as without it (tests/test_drift.py checks ε is identical). The hooks fire once
per logical batch (a skipped physical step never reaches the inner optimiser) and not at all when fp16 loss
scaling skips a step.

Where each term goes, and why:

- **FedProx** defines the client's objective, h_k(w) = F_k(w) + (μ/2)·‖w − w_global‖², which any local solver
  minimises inexactly. Its gradient μ(w − w_global) is added to ``p.grad`` in a step *pre*-hook, after Opacus'
  noise and before the optimiser's step, so AdamW or SGD steps on ∇h_k exactly as it would had the term been in
  the loss (Flower's and OpenFedLLM's FedProx add it to the loss). A tensor that got no gradient this step (not in
  the forward pass) takes none: it has not moved from w_global, where the term's gradient is zero.
- **SCAFFOLD** (option II) defines an update rule, y ← y − η(g − c_i + c), and estimates c_i from the update:
  c_i⁺ = c_i − c + (x − y)/(K·η). The control variates are in the units of the update per unit rate, so the
  correction is applied to the update, not to the gradient: a step *post*-hook moves y ← y − η·(c − c_i) after
  each optimiser step. With SGD (no momentum, no weight decay) that is exactly the paper's step; with AdamW the
  correction stays in the same units as the (x − y)/(K·η) it was estimated from, where adding it to the gradient
  would have AdamW rescale it by 1/√v (OpenFedLLM's SCAFFOLD applies it after the optimiser step the same way).
  K counts the steps the inner optimiser took and η is the round's rate (`K.LR`, a cosine across rounds).

The client keeps c_i in its `Context.state` (`K.STATE_SCAFFOLD`), starting from zero (or from the copy the server
kept, sent after a resume) and replies Δc_i = c_i⁺ − c_i = (x − y)/(K·η) − c (`K.SCAFFOLD_DELTA`); it then sets
c_i ← c_i + Δc_i, the same float operation the server does on its copy, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context, RecordDict

from fl import constants as K
from fl.wire import from_record, to_record

DRIFTS = ("none", "fedprox", "scaffold")
"""`drift.name` values."""


def validate_drift(cfg: Any) -> None:
    """Check the `drift` group of a composed config; errors name the key and the fix."""
    d = cfg.drift
    if d.name not in DRIFTS:
        raise ValueError(f"drift.name={d.name!r} is invalid: use one of {', '.join(DRIFTS)}.")
    if not (math.isfinite(float(d.mu)) and float(d.mu) >= 0):
        raise ValueError(f"drift.mu={d.mu!r} is invalid: use a proximal weight μ >= 0 (e.g. 0.01).")


def proximal_gradient(w: torch.Tensor, anchor: torch.Tensor, mu: float) -> torch.Tensor:
    """∇ (μ/2)·‖w − anchor‖² = μ·(w − anchor)."""
    return mu * (w - anchor)


def control_delta(
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    c: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
) -> dict[str, torch.Tensor]:
    """SCAFFOLD option II's Δc_i = c_i⁺ − c_i = (x − y)/(K·η) − c, float32 (zero when no step was taken).

    Parameters
    ----------
    x, y : mapping of str to Tensor
        The tensors the client received and the ones it trained, by name.
    c : mapping of str to Tensor
        The server's control variate this round.
    steps, lr : int, float
        K, the local steps taken, and η, the rate they were taken at.
    """
    if steps < 1:
        return {n: torch.zeros_like(c[n], dtype=torch.float32) for n in c}
    scale = 1.0 / (steps * lr)
    return {n: ((x[n].double() - y[n].double()) * scale - c[n].double()).float() for n in c}


class DriftControl:
    """`drift=none`: no hooks. Subclasses attach theirs to a round's inner optimiser (`attach`)."""

    def __init__(self) -> None:
        self.anchor: dict[str, torch.Tensor] = {}  # x: the trained tensors as the round started
        self.params: dict[str, torch.nn.Parameter] = {}
        self.steps = 0  # inner optimiser steps taken this round (K)
        self.lr = 0.0  # η of those steps
        self._handles: list[Any] = []

    def attach(self, optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Start a round: remember x (the parameters now) and hook `optimizer` (the inner one, not Opacus')."""
        self.params = dict(params)
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        self.steps, self.lr = 0, float(optimizer.param_groups[0]["lr"])
        self._handles = [
            optimizer.register_step_pre_hook(lambda *_: self.before_step()),
            optimizer.register_step_post_hook(lambda *_: self.after_step()),
        ]

    def detach(self) -> None:
        """End the round: remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def before_step(self) -> None:
        """Runs after the gradient is final (under DP: clipped, noised) and before the optimiser's step."""

    def after_step(self) -> None:
        """Runs after each optimiser step."""
        self.steps += 1


class FedProx(DriftControl):
    """FedProx (https://arxiv.org/abs/1812.06127): μ·(w − w_global) added to each step's gradient.

    w_global is what the trained tensors held when the round started: the server's tensors, or what a method has the
    client start from instead (FedSA-LoRA's personal B, FLoRA's fresh LoRA after its fold).

    Parameters
    ----------
    mu : float
        μ ≥ 0, the weight of (μ/2)·‖w − w_global‖².
    """

    def __init__(self, mu: float) -> None:
        super().__init__()
        self.mu = mu

    @torch.no_grad()
    def before_step(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.add_(proximal_gradient(p, self.anchor[name], self.mu).to(p.grad.dtype))


class Scaffold(DriftControl):
    """SCAFFOLD's client (https://arxiv.org/abs/1910.06378, option II): y ← y − η·(c − c_i) after each step.

    Parameters
    ----------
    c, c_i : mapping of str to Tensor
        The server's control variate (sent this round) and this client's, by trained-tensor name.
    """

    def __init__(self, c: Mapping[str, torch.Tensor], c_i: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.c, self.c_i = dict(c), dict(c_i)
        self.correction: dict[str, torch.Tensor] = {}  # c − c_i on the parameters' devices

    def attach(self, optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter]) -> None:
        if set(params) != set(self.c) or set(params) != set(self.c_i):
            missing, extra = sorted(set(params) - set(self.c))[:2], sorted(set(self.c) - set(params))[:2]
            raise ValueError(
                f"drift=scaffold: the control variates do not name the trained tensors (missing {missing}, "
                f"extra {extra}); the server and this client disagree on what trains."
            )
        super().attach(optimizer, params)
        self.correction = {n: (self.c[n] - self.c_i[n]).to(p.device) for n, p in self.params.items()}

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        lr = float(self.lr)
        for name, p in self.params.items():
            p.sub_(self.correction[name].to(p.dtype), alpha=lr)

    def delta(self) -> dict[str, torch.Tensor]:
        """Δc_i of this round (`control_delta`), from the parameters as they are now (y)."""
        y = {n: p.detach().cpu() for n, p in self.params.items()}
        x = {n: t.cpu() for n, t in self.anchor.items()}
        return control_delta(x, y, self.c, steps=self.steps, lr=self.lr)


def client_drift(cfg: Any, content: RecordDict, context: Context) -> DriftControl:
    """The drift control of a training message: FedProx with `drift.mu`, or SCAFFOLD with the message's c and
    this client's c_i (its `Context.state`, else the server's copy sent after a resume, else zero)."""
    name = str(cfg.drift.name)
    if name == "fedprox":
        return FedProx(float(cfg.drift.mu))
    if name != "scaffold":
        return DriftControl()
    if K.SCAFFOLD_C not in content.array_records:
        raise ValueError(f"drift=scaffold but the training message has no ArrayRecord {K.SCAFFOLD_C!r} (c).")
    c = from_record(content.array_records[K.SCAFFOLD_C])
    if K.STATE_SCAFFOLD in context.state.array_records:
        c_i = from_record(context.state.array_records[K.STATE_SCAFFOLD])
    elif K.SCAFFOLD_CLIENT in content.array_records:
        c_i = from_record(content.array_records[K.SCAFFOLD_CLIENT])
    else:
        c_i = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in c.items()}
    return Scaffold(c, c_i)


def finish_round(drift: DriftControl, content: RecordDict, context: Context) -> None:
    """SCAFFOLD: add Δc_i to the reply (`K.SCAFFOLD_DELTA`) and keep c_i + Δc_i in `Context.state`."""
    if not isinstance(drift, Scaffold):
        return
    delta = drift.delta()
    content[K.SCAFFOLD_DELTA] = to_record(delta)
    context.state[K.STATE_SCAFFOLD] = to_record({n: drift.c_i[n].float() + d for n, d in delta.items()})
