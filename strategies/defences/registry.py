"""The defence registry: `strategy.defence` name -> defence class. Adding a defence = one class + one `register`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from fl.config import StrategyConfig
from fl.config_defence import add_defence_schema, remove_defence_schema
from strategies.defences.base import Defence

_REGISTRY: dict[str, type[Defence]] = {}

DEFENCES: Mapping[str, type[Defence]] = MappingProxyType(_REGISTRY)
"""The registered defences by name, in registration order (``none``, the default, first): a read-only live view."""


def register(name: str, cls: type[Defence]) -> None:
    """Register a defence class under `name` (its `name`; names are unique) and its schema's fields as
    `strategy.<field>` (`fl.config_defence.add_defence_schema`)."""
    if not name.isidentifier():
        raise ValueError(f"Defence name {name!r} must be a Python identifier.")
    if not (isinstance(cls, type) and issubclass(cls, Defence)):
        raise TypeError(f"Defence {name!r} must be a strategies.defences.Defence subclass, got {cls!r}.")
    if cls.name != name:
        raise ValueError(f"{cls.__name__}.name is {cls.name!r}: register it under that name, not {name!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"A defence named {name!r} is already registered ({_REGISTRY[name].__name__}).")
    taken = sorted(set(cls.schema.__dataclass_fields__) & set(StrategyConfig.__dataclass_fields__))
    if taken:
        raise ValueError(f"Defence {name!r}: {taken} are fields of every strategy (strategy.*); rename them.")
    add_defence_schema(name, cls.schema)
    _REGISTRY[name] = cls


def unregister(name: str) -> None:
    """Remove a registered defence and its fields (a test's or plugin's defence; a no-op for an unknown name)."""
    if _REGISTRY.pop(name, None) is not None:
        remove_defence_schema(name)


def get_defence(name: str) -> type[Defence]:
    """The defence class for `name`; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"strategy.defence={name!r} is invalid: use one of {', '.join(_REGISTRY)}.") from None


def names() -> list[str]:
    """Registered defence names, in registration order (``none`` first)."""
    return list(_REGISTRY)


def make_defence(name: str, **params: Any) -> Defence:
    """The defence `name` built from its constructor's keyword arguments (checked there)."""
    return get_defence(name)(**params)
