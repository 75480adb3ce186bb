"""FedSVD: FFA-LoRA's frozen-A training, with the server re-factorising B̄·A by SVD after every round.

Lee, Jeong, Kim, Hwang, Lee, "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA",
NeurIPS 2025, https://arxiv.org/abs/2505.12805 (code: seanie12/fed-svd, read at commit 36650e2).

Update rule, per adapted module, with p_k = n_k / Σ_j n_j over the round's aggregated replies:

- clients train only B (and the task head) from the round's (A_t, B_t); A_t is frozen, so DP-SGD's noise on B is
  not multiplied through a trained A (FFA-LoRA's argument);
- the server averages B̄ = Σ_k p_k B_k (exact: Σ_k p_k B_k·A_t = B̄·A_t) and the head, then takes the thin SVD
  B̄·A_t = U·Σ·Vᵀ and sets A_{t+1} = V_rᵀ (orthonormal rows), B_{t+1} = U_r·Σ_r, so B_{t+1}·A_{t+1} = B̄·A_t:
  the global model does not move, only its factorisation (`svd_math.refactorize`; the round's `svd_residual`
  is ‖B_{t+1}A_{t+1} − B̄A_t‖ / ‖B̄A_t‖, float error). A_1 is PEFT's random A from the shared seed, as FFA-LoRA's.
  No α/r enters: the product is preserved, whatever the scaling.

The rows of B̄·A_t lie in A_t's row space, so the re-factorisation rotates A inside the r-dimensional space the
seed's A_1 spans (exactly so here, see below): what changes round to round is A's basis — orthonormal, aligned
with the aggregate's singular directions, B's columns ordered by singular value — and with it the clients' local
dynamics: B's gradient G·Aᵀ is G's projection (its norm ≤ ‖G‖, which is what bounds it under clipping), Adam's
per-coordinate steps and DP-SGD's isotropic noise act in that basis, and ‖ΔB‖ = ‖ΔB·A‖.

Bytes: uplink B and the head (FFA-LoRA's); downlink B, the head and, once A has left the seed's, the current A
to every client in every message (`frozen`, r·d_in floats per module; counted in `bytes_down`/`floats_down`).
The server's A is server state (`fixed`, in the checkpoint): a resumed run sends it from its first round.

Compositions (DESIGN.md "Crossing the axes"):

- privacy=dp: only B and the head are trained under DP-SGD; B̄, the SVD and A are post-processing.
- privacy=client: each client's update (B and head, in the round's A basis) is clipped and the mean noised by
  the wrapper; the re-factorisation runs after the noise (`server_step`), so A is post-processing of the release.
- strategy.defence: in the factor space (B, head), as FFA-LoRA: every client trained in the same A basis.
- server_opt: steps B̄ and the head before the re-factorisation. Its moments must outlive A's basis, so B is
  given to it in one fixed orthonormal frame F of A_1's row space (`svd_math.to_frame`: C = B·A·Fᵀ, so the
  global product is C·F and ‖ΔC‖ = ‖Δ(B·A)‖): the optimizer steps the global product in coordinates that do not
  change when A does, and the product stays exact (rank ≤ r) — FFA-LoRA's step in an orthonormal basis.
- drift=scaffold is refused: c and each c_i live in B's coordinates, which each re-factorisation changes.
- train.keep_optimizer_state: the kept client moments are in the previous round's A basis (not refused).
- export: `adapter/` holds the current A and B: a plain PEFT LoRA adapter.

Where this differs from the authors' code (`misc/utils.py:reinit_lora`, `fedmm/fedavg/server.py`):

- they take a full `torch.linalg.svd` of the dense d_out × d_in product; here the same factorisation comes from
  a QR of Aᵀ and the SVD of a d_out × r matrix (same singular values and vectors up to sign; where B̄·A has
  rank < r our trailing rows of A stay inside A's row space, theirs anywhere — B'·A' is B̄·A either way);
- they freeze the classifier head at its random init (only LoRA tensors are averaged); here the head is trained
  and averaged with weights p_k as in every method of this framework (`train.freeze_head=true` is theirs);
- their period and warm-up (`--recalculate-svd-period 1`, `--svd-warmup-steps 0`) are `svd_period` and
  `svd_warmup`, with the same rule (re-factorise after round t when t % period == 0 and t > warmup);
- their scripts use scaling 1 (lora_alpha = r = 8) and SGD lr 0.5 under DP; this config keeps FFA-LoRA's
  (alpha 16 at r 8, AdamW 2e-2) so the two compare like for like;
- server optimizers, client-level DP, defences and resume are ours (their code has none of them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict

from fl import constants as K
from fl.adapters import A_SUFFIX, B_SUFFIX
from fl.checks import require
from fl.config import StrategyConfig
from fl.wire import from_record, to_record
from strategies.base import LoraStrategy
from strategies.lora_math import combine_residuals, relative_residual
from strategies.stats import RoundStats
from strategies.svd_math import from_frame, orthonormal_frame, refactorize, to_frame

log = logging.getLogger(__name__)

SVD_RESIDUAL = "svd_residual"  # metrics.jsonl: ‖B'A' − B̄A‖ / ‖B̄A‖ of the round's re-factorisation
SVD_SECONDS = "svd_seconds"  # metrics.jsonl: server seconds the round's re-factorisation took


@dataclass
class FedSVDConfig(StrategyConfig):
    """FedSVD's fields (`strategy=fedsvd`)."""

    svd_period: int = 1  # re-factorise after every svd_period-th round (the authors' 1); 0: never (FFA-LoRA)
    svd_warmup: int = 0  # rounds 1..svd_warmup are not followed by a re-factorisation (the authors' 0)


class FedSVD(LoraStrategy):
    """FedSVD (https://arxiv.org/abs/2505.12805): FFA-LoRA's B̄, then B̄·A re-factorised as (U_r·Σ_r)·V_rᵀ.

    Parameters
    ----------
    svd_period : int
        Re-factorise after round t when t % svd_period == 0 (≥ 0; 0 never does, which is FFA-LoRA).
    svd_warmup : int
        No re-factorisation after rounds 1..svd_warmup (≥ 0).
    **kwargs
        `LoraStrategy`'s arguments.
    """

    title: ClassVar[str] = "FedSVD"
    adapter_kind: ClassVar[str] = "ffa"  # A frozen in the round, B and the head train (`fl.adapters`)
    update_space: ClassVar[str] = "factors"  # every client trains B in the same A basis (strategies.defences)
    schema: ClassVar[type[StrategyConfig]] = FedSVDConfig
    scaffold_problem: ClassVar[str | None] = (
        "each round's re-factorisation changes the basis of B (B' = B·A·A'ᵀ), so c and every client's c_i, kept in "
        "B's coordinates across rounds, would correct in a basis no client trains in any more"
    )
    average_problem: ClassVar[str | None] = (
        "each round re-factorises A, so the rounds' B̄ live in different bases and their mean is no round's model"
    )

    @classmethod
    def describe(cls, fields: Mapping[str, Any]) -> str:
        """``FedSVD r=8``, with the period and warm-up when they are not the authors'."""
        label = f"{cls.title} r={fields.get('rank')}"
        period, warmup = int(fields.get("svd_period", 1) or 0), int(fields.get("svd_warmup", 0) or 0)
        if period != 1:
            label += f" every {period}" if period else " (no SVD)"
        return label + (f" after {warmup}" if warmup else "")

    def __init__(self, *, svd_period: int = 1, svd_warmup: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require(svd_period >= 0, "strategy.svd_period", svd_period, "use 1 (every round), k > 1, or 0 (never).")
        require(svd_warmup >= 0, "strategy.svd_warmup", svd_warmup, "use 0 or more rounds.")
        self.svd_period, self.svd_warmup = svd_period, svd_warmup
        self.factored = False  # whether A has left the seed's A_1 (from then on it goes down in every message)
        self.frame = {n: orthonormal_frame(a) for n, a in self.fixed.items() if n.endswith(A_SUFFIX)}  # A_1's F
        self._frozen: ArrayRecord | None = None  # the current A, encoded once per re-factorisation

    @classmethod
    def params_from_config(cls, cfg: Any) -> dict[str, Any]:
        """The base's arguments plus the period and warm-up."""
        s = cfg.strategy
        own = {"svd_period": int(s.svd_period), "svd_warmup": int(s.svd_warmup)}
        return {**super().params_from_config(cfg), **own}

    def summary(self) -> None:
        """Log when A is re-factorised, then the base summary."""
        log.info("FedSVD: B̄·A re-factorised by SVD every %d round(s) after round %d", self.svd_period, self.svd_warmup)
        super().summary()

    def refactorizes(self, server_round: int) -> bool:
        """Whether round `server_round` (the run's, from 1) ends with a re-factorisation."""
        return self.svd_period > 0 and server_round % self.svd_period == 0 and server_round > self.svd_warmup

    def server_step(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The base's step (the server optimizer, if any, on B̄ and the head), then B̄·A -> (U_r·Σ_r, V_rᵀ).

        Runs after client-level DP's noise too (the wrapper calls it on the released aggregate)."""
        arrays = super().server_step(server_round, arrays)
        if arrays is None or not self.refactorizes(server_round):
            return arrays
        t0 = time.perf_counter()
        state, fixed, parts = from_record(arrays), dict(self.fixed), []
        for name, a in self.fixed.items():
            b_name = name[: -len(A_SUFFIX)] + B_SUFFIX
            b_new, a_new = refactorize(state[b_name], a)
            parts.append(relative_residual(state[b_name].double() @ a.double(), b_new, a_new))
            state[b_name], fixed[name] = b_new, a_new
        self.fixed, self.factored, self._frozen = fixed, True, None
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.extra[SVD_RESIDUAL] = combine_residuals(parts)
        stats.extra[SVD_SECONDS] = time.perf_counter() - t0
        return to_record(state)

    def arrays_for(self, node_id: int, arrays: ArrayRecord) -> RecordDict:
        """B and the head; the current A too once it is not the seed's (train and evaluate messages alike)."""
        content = super().arrays_for(node_id, arrays)
        if self.factored:
            if self._frozen is None:
                self._frozen = to_record(self.fixed)
            content[K.FROZEN] = self._frozen
        return content

    def materialize(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """B and the head from `arrays`, the current A from the server's state."""
        return {**self.fixed, **from_record(arrays)}

    def optimizer_view(self, arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The head as it is, each B as C = B·A·Fᵀ: the global product in A_1's fixed orthonormal frame F (float64)."""
        view = dict(arrays)
        for name, a in self.fixed.items():
            b_name = name[: -len(A_SUFFIX)] + B_SUFFIX
            if b_name in view:
                view[b_name] = to_frame(view[b_name], a, self.frame[name])
        return view

    def with_optimizer_view(
        self, arrays: Mapping[str, torch.Tensor], view: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Each stepped C back to B in the current A's basis (B·A = C·F), the head as stepped."""
        out = {**arrays, **view}
        for name, a in self.fixed.items():
            b_name = name[: -len(A_SUFFIX)] + B_SUFFIX
            if b_name in view:
                out[b_name] = from_frame(view[b_name], a, self.frame[name]).to(arrays[b_name].dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The base state (the current A is its `fixed`), whether A has been re-factorised, and the frame F."""
        return {**super().state_dict(), "factored": self.factored, "frame": dict(self.frame)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""
        super().load_state_dict(state)
        self.factored = bool(state.get("factored", False))
        self.frame = dict(state.get("frame", self.frame))
        self._frozen = None
