"""FedSA-LoRA: the server averages the A matrices; every client keeps its own B (personalisation).

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025,
https://arxiv.org/abs/2410.01463 — A learns what the clients share, B what is their own.

Update rule, per adapted module, with p_k = n_k / Σ_j n_j over the round's aggregated replies:

- Ā = Σ_k p_k A_k is broadcast; client k starts its next round from (Ā, B_k), B_k its own as it last trained it
  (PEFT's initialisation, zero, before its first round). The server never sends B: the ClientApp keeps B in its
  `Context.state` and loads it over anything a message holds (the ConfigRecord's `personal-suffixes`).
- The task head is trained by every client, averaged with weights p_k and broadcast, as in every method here:
  the paper personalises through B, a personal head would be another method (FedPer/FedRep's), and a head
  trained on a client's few Dirichlet classes forgets the others. Methods then compare on the same head rule.
- B̄ = Σ_k p_k B_k is the server's alone. Clients still upload B_k so that the server has a global model for
  central evaluation, checkpoints and `adapter/`: W0 + s·B̄·Ā with the mean head (s = alpha / r), a plain PEFT
  LoRA. Client k's own model is W0 + s·B_k·Ā: judge the method by per-client evaluation
  (`data.client_test_fraction`, `sim.fraction_evaluate`), which scores it on the client's held-out share.

Bytes: uplink A, B and the head (FedIT's); downlink Ā and the head only (r·d_in per module, half of FedIT's for
square modules). The round's `residual` is the server model's: ‖Σ p_k B_k A_k − B̄·Ā‖ / ‖Σ p_k B_k A_k‖.
One rank for all (mixed ranks are refused: Ā needs one shape). A resumed run's clients start B afresh (their
`Context.state` belongs to the run that ended; the server holds only B̄).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict

from fl import constants as K
from fl.adapters import B_SUFFIX
from fl.wire import from_record, to_record
from strategies.base import LoraStrategy
from strategies.lora_math import weighted_average


def shared_part(state: Mapping[str, torch.Tensor], personal: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of `state` a client is sent: all but those whose names end with a `personal` suffix."""
    return {n: t for n, t in state.items() if not n.endswith(personal)}


class FedSALoRA(LoraStrategy):
    """FedSA-LoRA (https://arxiv.org/abs/2410.01463): FedAvg over A and the head; B stays on each client."""

    title: ClassVar[str] = "FedSA-LoRA"

    adapter_kind: ClassVar[str] = "lora"
    update_space: ClassVar[str] = "factors"  # a defence acts on A_k, B_k, head: Ā and the head reach others linearly
    personal_suffixes: ClassVar[tuple[str, ...]] = (B_SUFFIX,)
    """Tensor-name suffixes each client keeps as its own and is never sent (sent as `K.PERSONAL`)."""
    client_dp_problem: ClassVar[str | None] = (
        "each client's B stays on the client and drifts from the server's mean B̄, and B is never sent, so a "
        "reply minus the global arrays is not an update of the model the client was sent: clipping it would bound "
        "the client's personalisation rather than its contribution to the round, and a node-side clip has no "
        "sent B to measure against"
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sent: tuple[ArrayRecord, ArrayRecord] | None = None  # (this round's global record, its shared part)

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """Ā and the head: the global arrays without any B (encoded once per round)."""
        if self._sent is None or self._sent[0] is not arrays:
            self._sent = (arrays, to_record(shared_part(from_record(arrays), self.personal_suffixes)))
        return RecordDict({K.ARRAYS: self._sent[1]})

    def extra_config(self, server_round: int) -> dict[str, Any]:
        """Tell every client which tensors are its own (train and evaluate messages alike)."""
        return {K.PERSONAL: list(self.personal_suffixes)}

    def optimizer_view(self, arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A server optimizer steps Ā and the head, what is broadcast; B̄ stays the plain mean (server model only)."""
        return shared_part(arrays, self.personal_suffixes)

    def aggregate_arrays(
        self, server_round: int, states: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """Ā = Σ p_k A_k and the head (broadcast), B̄ = Σ p_k B_k (the server's model only; `arrays_for` drops it)."""
        return weighted_average(states, weights)
