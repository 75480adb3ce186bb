"""Per-example clipping modes for DP-SGD (`privacy.clipping`): which bound each trainable tensor gets.

Opacus clips (flat, or per layer with one bound per parameter); this module only chooses the per-layer bounds
and fixes one dtype gap in Opacus' per-layer optimizer (below).
"""

from __future__ import annotations

import math

import torch
from opacus.optimizers import DPPerLayerOptimizer

# Opacus 1.6.0 keeps the flag that stops one backward pass being clipped twice only in these private helpers (its
# own per-layer optimizer calls them); there is no public form, and copying them would copy the flag's encoding.
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fl.adapters import HEAD_MARK

CLIPPINGS = ("flat", "per_layer")
"""``flat``: each example's gradient over all trainable tensors together is clipped to C. ``per_layer``
(Opacus' per-layer clipping): each trainable tensor's per-example gradient is clipped to C/√P on its own, P the
number of trainable tensors, so the whole is still ≤ C, and σ, the noise σC and the accounting are unchanged.
Under flat clipping one large tensor can take the whole bound: at the start of a classification run the new
head's part of an example's gradient norm of 1.35 is 1.34 and the adapter's 0.11 (BENCHMARKS.md), so the adapter's
share of the signal drowns in noise added to every coordinate alike."""


class PerLayerOptimizer(DPPerLayerOptimizer):
    """Opacus' per-layer DP optimizer, with lower-precision per-example gradients cast to the parameter's dtype
    before clipping, as Opacus' flat `DPOptimizer.clip_and_accumulate` does (its per-layer one does not, and
    under bf16 autocast it then assigns a bf16 sum to an fp32 parameter's gradient and fails)."""

    def clip_and_accumulate(self) -> None:
        for p, bound in zip(self.params, self.max_grad_norms, strict=True):
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            norms = grad_sample.reshape(len(grad_sample), -1).norm(2, dim=-1)
            factor = (bound / (norms + 1e-6)).clamp(max=1.0)
            grad = (factor.view(-1, *[1] * (grad_sample.dim() - 1)) * grad_sample).sum(0)  # no autocast (einsum is)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


def per_layer_bounds(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float, *, head_share: float | None
) -> list[float]:
    """One clipping bound per optimizer parameter, in order, with Σ C_i² = C²: equal, or `head_share` of C² over
    the head's tensors (names with ``modules_to_save``) and the rest over the others. Equal when either group is
    empty (e.g. a causal LM has no separate head)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    head = [HEAD_MARK in names.get(id(p), "") for p in params]
    n_head = sum(head)
    if head_share is None or n_head in (0, len(params)):
        return [max_grad_norm / math.sqrt(len(params))] * len(params)
    c_head = max_grad_norm * math.sqrt(head_share / n_head)
    c_rest = max_grad_norm * math.sqrt((1 - head_share) / (len(params) - n_head))
    return [c_head if h else c_rest for h in head]
