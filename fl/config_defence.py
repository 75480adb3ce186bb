"""The defences' schemas (`strategy.defence=<name>`): each defence's own fields, in the strategy group.

A defence (`strategies.defences`) declares its fields as a dataclass extending `DefenceConfig` and registers it;
`fl.config.register_configs` then stores every strategy's schema with those fields after its own
(`strategy_node`), so the command line keeps one group (`strategy.defence=trimmed_mean strategy.trim_fraction=0.3`)
and a misspelt or mistyped field fails at compose with Hydra's own message, like a method's field.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, Field, dataclass, field, fields, make_dataclass
from typing import Any


@dataclass
class DefenceConfig:
    """The fields one defence adds to the strategy group (`strategy.<field>`); empty: the defence has none."""


DEFENCE_SCHEMAS: dict[str, type[DefenceConfig]] = {}
"""`strategy.defence` name -> its schema, in registration order (`strategies.defences.register` adds them)."""

_GENERATION = [0]  # bumped whenever DEFENCE_SCHEMAS changes (`fl.config`'s compose cache is keyed on it)


def generation() -> int:
    """How many times the registered schemas changed: a composed config is reused only while this holds."""
    return _GENERATION[0]


def add_defence_schema(name: str, schema: type[DefenceConfig]) -> None:
    """Make `schema`'s fields part of every strategy's schema.

    Every field needs a default (a run with another defence composes too). A field another defence also has
    must agree in type and default (Krum's and Multi-Krum's `krum_f`); otherwise it is refused, naming both."""
    if not (isinstance(schema, type) and issubclass(schema, DefenceConfig)):
        raise TypeError(f"The schema of defence {name!r} must extend fl.config_defence.DefenceConfig, got {schema!r}.")
    if DEFENCE_SCHEMAS.get(name, schema) is not schema:
        raise ValueError(f"Defence {name!r} already has the schema {DEFENCE_SCHEMAS[name].__name__}.")
    mine = _fields(schema)
    for key, (_, f) in mine.items():
        if f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"Defence {name!r}: strategy.{key} needs a default (runs without {name} compose too).")
    for other, known in DEFENCE_SCHEMAS.items():
        theirs = _fields(known)
        for key in set(mine) & set(theirs):
            if other != name and _signature(*mine[key]) != _signature(*theirs[key]):
                raise ValueError(
                    f"Defence {name!r}: strategy.{key} is also a field of defence {other!r} with another type or "
                    "default; give it another name."
                )
    DEFENCE_SCHEMAS[name] = schema
    _GENERATION[0] += 1


def remove_defence_schema(name: str) -> None:
    """Take a defence's fields out of the strategy schemas again (`strategies.defences.unregister`)."""
    if DEFENCE_SCHEMAS.pop(name, None) is not None:
        _GENERATION[0] += 1


def defence_fields() -> set[str]:
    """The names of every registered defence's fields: the keys a strategy's config holds besides its own."""
    return {key for schema in DEFENCE_SCHEMAS.values() for key in schema.__dataclass_fields__}


def strategy_node(schema: type) -> type:
    """The Hydra node of `/schema/strategy/<name>`: the method's `schema` with every registered defence's fields
    after its own (in registration order; a field two defences share, once). A method field of the same name
    as a defence's is refused."""
    extra: dict[str, tuple[Any, Field[Any]]] = {}
    for defence in DEFENCE_SCHEMAS.values():
        for key, typed in _fields(defence).items():
            extra.setdefault(key, typed)
    clash = sorted(set(extra) & {f.name for f in fields(schema)})
    if clash:
        raise ValueError(f"{schema.__name__} has field(s) {clash} that a registered defence declares too.")
    if not extra:
        return schema
    added = [
        (key, kind, field(default=f.default, default_factory=f.default_factory)) for key, (kind, f) in extra.items()
    ]
    return make_dataclass(schema.__name__, added, bases=(schema,), namespace={"__module__": schema.__module__})


def _fields(schema: type) -> dict[str, tuple[Any, Field[Any]]]:
    """Each field of `schema` with its resolved type (Hydra needs types, not the strings of postponed hints)."""
    hints = typing.get_type_hints(schema)
    return {f.name: (hints[f.name], f) for f in fields(schema)}


def _signature(kind: Any, f: Field[Any]) -> tuple[Any, Any, Any]:
    """What two defences sharing a field must agree on: its type, default and default factory."""
    return kind, f.default, f.default_factory
