"""FFA-LoRA: federated LoRA with A frozen at a shared random initialisation; only B is averaged.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
https://arxiv.org/abs/2403.12313

Every party draws A from the run seed (`fl.adapters`, kind ``ffa``), so no bytes are spent on it.
Update rule, per adapted module: B̄ = Σ_k p_k B_k. Exact, because Σ_k p_k B_k·A = B̄·A: the residual
is zero up to float error. Uplink r·d_out per module (half of FedIT for square modules). The paper
tunes FFA with a larger learning rate than LoRA and a fixed scaling.
"""

from __future__ import annotations

from typing import ClassVar

from strategies.base import LoraStrategy


class FFALoRA(LoraStrategy):
    """FFA-LoRA (https://arxiv.org/abs/2403.12313): frozen shared A, FedAvg over B and the head."""

    title: ClassVar[str] = "FFA-LoRA"

    adapter_kind: ClassVar[str] = "ffa"
    update_space: ClassVar[str] = "factors"  # the trained factor is the whole update (strategies.defences)
