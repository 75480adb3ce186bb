"""Server-side model averaging: the model the server scores and exports is the running mean of the global models.

Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, "Averaging Weights Leads to Wider Optima and Better
Generalization" (SWA), UAI 2018, https://arxiv.org/abs/1803.05407; in federated learning on the server, over the
rounds' global models: Caldarola, Caputo, Ciccone, "Improving Generalization in Federated Learning by Seeking Flat
Minima" (FedSWA), ECCV 2022, https://arxiv.org/abs/2203.11834.

With x_t the global arrays after round t and T0 = `server_opt.average_from`, the server scores and exports

    x̄_t = x_t                                  for t < T0
    x̄_t = (1 / (t − T0 + 1)) · Σ_{s=T0..t} x_s   for t ≥ T0   (updated as x̄ ← x̄ + (x_t − x̄) / n)

or, with a window k = `server_opt.average_window` > 0, the same mean for the first k rounds from T0 and then an
exponential moving average x̄ ← x̄ + (x_t − x̄) / k (a late global weighs 1/k, one k rounds older ~1/(e·k)): the mean
forgets the early rounds that a uniform mean from T0 keeps at full weight.

while the clients keep training from x_t itself: the trajectory is the run's without averaging, only what is
evaluated differs. FedSWA also cycles the client rate within each averaging window; here the rate is whatever
`train.lr_schedule` says. The mean is taken over the method's global arrays (`to_record` of what it sends): exact in
the model for FFA-LoRA (A fixed: the mean of B̄_t is the mean of the products), Fed-SB (the mean of R̄_t) and the
heads; for FedIT the mean of the factors, not of their products, as FedAvg's own mean is. A method whose global arrays
change basis between rounds (FedSVD re-factorises A each round) or live partly in W0 (FedEx-LoRA, FLoRA) or on the
server only (FlexLoRA's ΔW) declares `average_problem` and is refused at compose.

Why not torch.optim.swa_utils.AveragedModel: it wraps an nn.Module and averages its parameters in place; the
server's state here is a dict of the method's global tensors between rounds (no module is trained on the server),
and the mean must be checkpointed with the run (`state_dict`) so a resumed run exports what the uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

STATE_TYPE = "fedlora-model-average"


class ModelAverage:
    """The running mean of the global arrays from round `start` on (`start=0`: off, the arrays themselves).

    Parameters
    ----------
    start : int
        T0, the first round whose global joins the mean (`server_opt.average_from`); 0 turns averaging off.
    window : int
        k (`server_opt.average_window`): after k rounds the mean becomes an exponential moving average of weight
        1/k; 0 keeps the uniform mean of every round from T0.
    """

    def __init__(self, start: int = 0, window: int = 0) -> None:
        if start < 0:
            raise ValueError(f"server_opt.average_from={start} is invalid: use 0 (off) or a round >= 1.")
        if window < 0:
            raise ValueError(f"server_opt.average_window={window} is invalid: use 0 (every round) or a window >= 1.")
        if window and not start:
            raise ValueError(
                f"server_opt.average_window={window} needs server_opt.average_from >= 1 (the round averaging starts)."
            )
        self.start, self.window = int(start), int(window)
        self.mean: dict[str, torch.Tensor] = {}
        self.count = 0
        self.last_round = 0

    @property
    def active(self) -> bool:
        return self.start > 0

    def describe(self, rounds: int | None = None) -> str:
        late = (
            f" (after the last round, {rounds}: nothing is averaged unless the run is extended)"
            if (rounds is not None and self.start > rounds)
            else ""
        )
        how = f"an exponential moving average (weight 1/{self.window})" if self.window else "the mean"
        return f"the model scored and exported is {how} of the globals from round {self.start} on (SWA){late}"

    def update(self, server_round: int, arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add round `server_round`'s global `arrays` (from round `start` on; once per round) and return the model
        the server scores after it: the mean so far, or `arrays` before `start`."""
        if not self.active or server_round < self.start:
            return dict(arrays)
        if server_round <= self.last_round:
            raise ValueError(
                f"round {server_round} was already averaged (the mean holds rounds up to {self.last_round})"
            )
        if self.count and set(arrays) != set(self.mean):
            raise ValueError("the global arrays changed names between rounds; they cannot be averaged")
        self.count += 1
        self.last_round = int(server_round)
        for key, value in arrays.items():
            x = value.detach().to(torch.float64)
            prev = self.mean.get(key)
            self.mean[key] = (
                x.clone() if prev is None else prev + (x - prev) / min(self.count, self.window or self.count)
            )
        return self.model(arrays)

    def model(self, arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The averaged model in the dtypes of `arrays` (which it replaces), or `arrays` while nothing is averaged."""
        if not self.count:
            return dict(arrays)
        return {k: self.mean[k].to(v.dtype) for k, v in arrays.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "type": STATE_TYPE,
            "start": self.start,
            "window": self.window,
            "count": self.count,
            "last_round": self.last_round,
            "mean": dict(self.mean),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:  # a checkpoint written before averaging existed, or with it off
            return
        if state.get("type") != STATE_TYPE:
            raise ValueError(f"not a model-average state: {state.get('type')!r}")
        if (int(state["start"]), int(state.get("window", 0))) != (self.start, self.window) and int(state["count"]):
            raise ValueError(
                f"server_opt.average_from={self.start} average_window={self.window}, but the checkpoint's mean has "
                f"average_from={state['start']} average_window={state.get('window', 0)}: resume with the same values"
            )
        self.count, self.last_round = int(state["count"]), int(state["last_round"])
        self.mean = {k: v.to(torch.float64) for k, v in state["mean"].items()}
