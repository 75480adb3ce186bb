"""The client's local optimiser (`train.optimizer`) and its state across the rounds a client joins.

A client builds a new optimiser every round. AdamW's first steps from a fresh state are sign-like: with
zero moments, step 1 moves every coordinate by about lr whatever its gradient's size. Under DP-SGD, where
the noise dominates most coordinates of a logical batch's gradient, a few such steps per round are mostly a
random walk. `train.keep_optimizer_state=true` keeps the optimiser's state (AdamW's moments and step count,
SGD's momentum buffer) in the client's `Context.state` and restores it next round, so the second moment is
estimated over every step the client has taken. The state is a function of the client's (noised) updates:
under DP it is post-processing, and it never leaves the client.

torch.optim has the optimisers and their `state_dict`; what is written here is only the registry and the
flattening of a state dict into the flat name -> tensor map a Flower `ArrayRecord` holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch

log = logging.getLogger(__name__)

# name -> (params, lr, weight_decay, momentum) -> optimiser. Extension point: register another torch optimiser.
OptimizerFactory = Callable[[list[torch.nn.Parameter], float, float, float], torch.optim.Optimizer]


def _adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _sgd(params: list[torch.nn.Parameter], lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)


OPTIMIZERS: dict[str, OptimizerFactory] = {"adamw": _adamw, "sgd": _sgd}


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """The optimiser `train.optimizer` names, over `params` (momentum is SGD's; AdamW ignores it)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer={name!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")
    return OPTIMIZERS[name](list(params), lr, weight_decay, momentum)


def state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as ``{"<param index>.<name>": tensor}`` (copies on the CPU).

    Only tensors are kept (AdamW: step, exp_avg, exp_avg_sq; SGD: momentum_buffer); the hyperparameters
    come from the round's config each round (e.g. the scheduled lr).
    """
    out: dict[str, torch.Tensor] = {}
    for idx, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                out[f"{idx}.{key}"] = value.detach().to("cpu", copy=True)
    return out


def load_state_tensors(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Restore what `state_tensors` saved into a new optimiser over the same parameters.

    Returns False (and leaves the optimiser fresh) when the saved state does not fit: another number of
    parameters, another shape, or another optimiser's keys, e.g. after the run's config changed on a resume;
    or when it holds NaN or inf (a diverged round must not poison the next).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx_text, _, key = name.partition(".")
        if not idx_text.isdigit() or int(idx_text) >= len(params):
            log.warning("optimiser state entry %r does not fit this model; starting the optimiser fresh", name)
            return False
        param = params[int(idx_text)]
        if not bool(torch.isfinite(value).all()):
            log.warning("optimiser state %r holds NaN or inf; starting the optimiser fresh", name)
            return False
        if key != "step" and value.shape != param.shape:
            log.warning(
                "optimiser state %r has shape %s, its parameter %s; starting the optimiser fresh",
                name,
                tuple(value.shape),
                tuple(param.shape),
            )
            return False
        state.setdefault(int(idx_text), {})[key] = value.to(param.device)
    expected = set(_state_keys(optimizer))
    foreign = sorted({key for entry in state.values() for key in entry} - expected)
    if expected and foreign:
        log.warning("the saved optimiser state is another optimiser's (%s); starting the optimiser fresh", foreign)
        return False
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)
    return True


def _state_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    if isinstance(optimizer, torch.optim.AdamW | torch.optim.Adam):
        return ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    if isinstance(optimizer, torch.optim.SGD):
        return ("momentum_buffer",)
    return ()  # an optimiser registered later: its state is restored as saved
