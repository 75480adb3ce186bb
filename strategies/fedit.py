"""FedIT: federated instruction tuning with LoRA, averaging A and B separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024,
https://arxiv.org/abs/2305.05644 — the baseline FlowerTune uses.

Update rule, per adapted module: Ā = Σ_k p_k A_k, B̄ = Σ_k p_k B_k with p_k = n_k / Σ_j n_j. It is inexact:
B̄·Ā ≠ Σ_k p_k B_k·A_k, and the gap is reported as the round's `residual`.
"""

from __future__ import annotations

from typing import ClassVar

from strategies.base import LoraStrategy


class FedIT(LoraStrategy):
    """FedIT (https://arxiv.org/abs/2305.05644): FedAvg over LoRA A, B and the head."""

    title: ClassVar[str] = "FedIT"

    adapter_kind: ClassVar[str] = "lora"
    update_space: ClassVar[str] = "product"  # a defence acts on B_k·A_k − B̄·Ā (strategies.defences)
