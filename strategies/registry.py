"""The strategy registry: `strategy.name` -> strategy class. Adding a method = one file + one line."""

from __future__ import annotations

from fl.config import add_strategy_schema
from strategies.base import LoraStrategy

_REGISTRY: dict[str, type[LoraStrategy]] = {}


def register(name: str, cls: type[LoraStrategy]) -> None:
    """Register a strategy class under `name` (names are unique) and its schema as `/schema/strategy/<name>`."""
    if not name.isidentifier():
        raise ValueError(f"Strategy name {name!r} must be a Python identifier.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"A strategy named {name!r} is already registered ({_REGISTRY[name].__name__}).")
    add_strategy_schema(name, cls.schema)
    _REGISTRY[name] = cls


def get_strategy(name: str) -> type[LoraStrategy]:
    """The strategy class for `name`; a typo lists the valid names."""
    if name not in _REGISTRY:
        raise KeyError(f"Unknown strategy {name!r}; valid strategies: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered strategy names."""
    return sorted(_REGISTRY)
