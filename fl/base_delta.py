"""A change to the frozen base weights W0 that travels with the adapter (FedEx-LoRA's folded residual).

A method that folds part of the global update into W0 keeps the *cumulative* fold ΔW0 per adapted
module and sends it whole; every party sets ``base_layer.weight = W0_pretrained + ΔW0``. Values are
absolute, never added in place: a process serves many virtual clients with one cached model, and a
client that skipped rounds still lands on the global model. The pretrained W0 of each changed weight
is kept beside the model (a weak reference, so it goes when the model does), and a message without a
fold restores it.

Export: `save_base_delta` writes ``base_delta.safetensors`` keyed by the *plain* base model's parameter
names (``bert.encoder.layer.0.attention.self.query.weight``), so the model is reproduced with plain
transformers + PEFT (see `apply_to_base`)::

    base = AutoModelForSequenceClassification.from_pretrained(NAME, num_labels=3)
    apply_to_base(base, "adapter/base_delta.safetensors")   # W0 += ΔW0, by name
    model = PeftModel.from_pretrained(base, "adapter")

A fold sent as factor pairs (FLoRA's stacks of every round so far: `factored`) is turned into ΔW0 by
`delta_from_factors`, or, by a party that keeps what it folded between messages, by `fold_factors`: only the
parts (rounds) it has not folded before are multiplied out.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fl.adapters import BASE_SUFFIX

BASE_DELTA_FILE = "base_delta.safetensors"
PEFT_PREFIX = "base_model.model."

_PRETRAINED: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def base_weight_name(prefix: str) -> str:
    """The PEFT parameter name of an adapted module's frozen W0, from the module's name prefix."""
    return prefix + BASE_SUFFIX


def apply_base_delta(model: torch.nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
    """Set every W0 named in `delta` to its pretrained value + delta; restore every other W0 changed before.

    Parameters
    ----------
    model : torch.nn.Module
        The PEFT model (its parameter names are the keys of `delta`).
    delta : mapping of str to Tensor
        The cumulative ΔW0 per base weight name (empty: the pretrained model).
    """
    saved = _PRETRAINED.get(model)
    if not delta and not saved:
        return
    if saved is None:
        saved = _PRETRAINED.setdefault(model, {})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in [n for n in saved if n not in delta]:
            params[name].copy_(saved.pop(name))
        for name, d in delta.items():
            if name not in params:
                raise KeyError(f"The base-weight delta names {name!r}, which is not a parameter of the model.")
            p = params[name]
            if tuple(p.shape) != tuple(d.shape):
                raise ValueError(f"Shape mismatch for {name!r}: model {tuple(p.shape)}, delta {tuple(d.shape)}.")
            if name not in saved:
                saved[name] = p.detach().clone()
            p.copy_(saved[name] + d.to(device=p.device, dtype=p.dtype))


FACTOR_SEP = "|"  # a factored delta's keys: "<part>|<base weight name>|B" and "...|A"; ΔW0 = Σ_parts B·A


def factored(parts: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """A change to W0 held as factor pairs: {part: {base weight name: (B, A)}} -> flat tensors to send."""
    out: dict[str, torch.Tensor] = {}
    for part, pairs in parts.items():
        for name, (B, A) in pairs.items():
            out[f"{part}{FACTOR_SEP}{name}{FACTOR_SEP}B"] = B
            out[f"{part}{FACTOR_SEP}{name}{FACTOR_SEP}A"] = A
    return out


def delta_from_factors(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW0 per base weight name = Σ over parts of B·A (float64 sums, float32 out), from `factored`'s tensors."""
    acc: dict[str, torch.Tensor] = {}
    for pairs in factor_parts(flat).values():
        for name, (B, A) in pairs.items():
            prod = _product(B, A)
            acc[name] = acc[name] + prod if name in acc else prod
    return {k: v.float() for k, v in acc.items()}


def factor_parts(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """`factored`'s flat tensors back as {part: {base weight name: (B, A)}}, parts in order (`part_order`)."""
    parts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in sorted(flat):
        part, name, which = key.split(FACTOR_SEP)
        if which != "B":
            continue
        A = flat.get(f"{part}{FACTOR_SEP}{name}{FACTOR_SEP}A")
        if A is None:
            raise KeyError(f"The factored base delta has B but no A for {name!r} (part {part}).")
        parts.setdefault(part, {})[name] = (flat[key], A)
    return {p: parts[p] for p in sorted(parts, key=part_order)}


def part_order(part: str) -> tuple[int, str]:
    """Sort key of a part's name: round numbers in numeric order ("2" before "10"), then any other name."""
    return (int(part), "") if part.isdigit() else (1 << 62, part)


def _product(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """B·A in float64 (one part of a factored ΔW0)."""
    return B.double() @ A.double()


class FactorFold:
    """ΔW0 = Σ over parts of B·A (`factored`), kept between messages: each new part is multiplied out once.

    FLoRA sends the stacks of every round so far (so a client that missed rounds, or a process serving many
    virtual clients with one model, still lands on the global W0); rebuilding Σ_t B_t·A_t from all of them on
    every message costs rounds × the product. This keeps the running sum and folds only the parts it has not seen,
    in round order, each product in float64 and the sum in float32: the server's own fold (`strategies.flora`).
    A fingerprint of every folded part (a hash of its tensors) is kept too: a message whose earlier parts differ
    from those folded, or lack one (another run in this process, a restarted server), is folded from scratch.
    """

    def __init__(self) -> None:
        self.digests: dict[str, bytes] = {}  # part -> fingerprint of its (B, A) pairs
        self.delta: dict[str, torch.Tensor] = {}  # base weight name -> Σ over folded parts of B·A (float32)

    def update(self, flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ΔW0 per base weight name for a message's factored fold (`factored`'s tensors); do not modify in place."""
        parts = factor_parts(flat)
        digests = {part: _digest(pairs) for part, pairs in parts.items()}
        if any(digests.get(part) != d for part, d in self.digests.items()):
            self.digests, self.delta = {}, {}
        for part, pairs in parts.items():
            if part in self.digests:
                continue
            for name, (B, A) in pairs.items():
                prod = _product(B, A).float()
                self.delta[name] = self.delta[name] + prod if name in self.delta else prod
            self.digests[part] = digests[part]
        return dict(self.delta)


_FOLDS: weakref.WeakKeyDictionary[torch.nn.Module, FactorFold] = weakref.WeakKeyDictionary()


def fold_factors(model: torch.nn.Module, flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW0 of a factored fold for `model`'s party: `delta_from_factors(flat)`, but multiplying out only the parts
    not folded for this model before (`FactorFold`, kept beside the model while it lives)."""
    fold = _FOLDS.get(model)
    if fold is None:
        fold = _FOLDS.setdefault(model, FactorFold())
    return fold.update(flat)


def _digest(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(pairs):
        h.update(name.encode())
        for t in pairs[name]:
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def plain_name(peft_name: str) -> str:
    """``base_model.model.X.base_layer.weight`` -> ``X.weight`` (the name in the plain base model)."""
    name = peft_name.removeprefix(PEFT_PREFIX)
    return name[: -len(BASE_SUFFIX)] + ".weight" if name.endswith(BASE_SUFFIX) else name


def save_base_delta(delta: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write ``<out_dir>/base_delta.safetensors`` keyed by the plain base model's parameter names."""
    path = Path(out_dir) / BASE_DELTA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({plain_name(k): v.detach().contiguous().cpu() for k, v in sorted(delta.items())}, str(path))
    return path


def apply_to_base(base: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Add a saved ``base_delta.safetensors`` to a plain (not yet PEFT-wrapped) base model, in place."""
    with torch.no_grad():
        for name, d in load_file(str(path)).items():
            base.get_parameter(name).add_(d.to(base.get_parameter(name).dtype))
    return base
