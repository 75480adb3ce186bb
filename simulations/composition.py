"""The composition matrix: the axes a run may combine, read from the registries, and which combinations compose.

Usage::

    python -m simulations.composition          # composes the covering below (~1 min), writes docs/composition.md

The compose-time axes (DESIGN.md, "Crossing the axes"): the method (`strategies.names()`), privacy (off, sample-level
`privacy=dp`, client-level `privacy=client`), the defence (`strategies.robust.DEFENCES`), the clients' ranks
(uniform, or mixed `sim.client_ranks=[1,2]`), the server optimizer (`strategies.server_opt.SERVER_OPTIMIZERS`) and
drift control (`clients.drift.DRIFTS`). A method, defence or optimizer enters the matrix by being registered. The
attack (`sim.attack`) and resume are run-time axes: compose does not read them (tests/test_composition.py crosses
them in its runs).

The full product is 4,860 cells at ~0.6 s a compose, so `cover` composes a covering of every *pair* of axis values
instead, learning the refusals as it goes: a refusal names the keys of the values it refuses together (its
`named` set); those values are never put in one cell again, and a pair is settled when a composed cell holds it
or the refusal named exactly that pair. Every check at compose is a rule on a pair of values, or a triple
naming a method (`drift=scaffold` with a defence names the method too; `_learn` drops the method from a triple).
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import strategies
from clients.drift import DRIFTS
from fl.app.config import compose
from fl.config import StrategyConfig
from fl.runtime_env import set_quiet_env
from strategies.defences.registry import get_defence
from strategies.robust import DEFENCES
from strategies.server_opt import SERVER_OPTIMIZERS

Value = tuple[str, str]
"""(axis, value), e.g. ("privacy", "client")."""
Cell = dict[str, str]
"""One value per axis."""
Pair = frozenset[Value]

PRIVACY = ("off", "dp", "client")
RANKS = ("uniform", "mixed")
MIXED_RANKS = "sim.client_ranks=[1,2]"
BASE = ("strategy.rank=2", "sim.num_clients=3")
"""What every cell composes with: rank 2 (mixed clients train at 1 and 2) and 3 clients (Krum needs a few)."""
DOC = Path(__file__).resolve().parent.parent / "docs" / "composition.md"


def axes() -> dict[str, tuple[str, ...]]:
    """Each compose-time axis and its values, the default (what a run gets without the override) first."""
    return {
        "strategy": tuple(strategies.names()),
        "privacy": PRIVACY,
        "defence": tuple(DEFENCES),
        "ranks": RANKS,
        "server_opt": tuple(SERVER_OPTIMIZERS),
        "drift": tuple(DRIFTS),
    }


def overrides(cell: Cell) -> list[str]:
    """The Hydra overrides of a cell (a defence with a bound gets the round's median, or the DP clip under
    client-level DP)."""
    out = [f"strategy={cell['strategy']}"]
    if cell["privacy"] != "off":
        out.append(f"privacy={cell['privacy']}")
    if cell["defence"] != "none":
        out.append(f"strategy.defence={cell['defence']}")
        bounded = any(f.name == "defence_bound" for f in fields(get_defence(cell["defence"]).schema))
        if bounded and cell["privacy"] != "client":
            out.append("strategy.defence_bound=median")
    if cell["ranks"] == "mixed":
        out.append(MIXED_RANKS)
    if cell["server_opt"] != "none":
        out.append(f"server_opt={cell['server_opt']}")
    if cell["drift"] != "none":
        out.append(f"drift={cell['drift']}")
    return out


def key_of(axis: str, value: str) -> str:
    """How a refusal names this value: the override it came from (`strategy.defence=median`, `privacy=client`)."""
    return {
        "strategy": f"strategy={value}",
        "privacy": f"privacy={value}",
        "defence": f"strategy.defence={value}",
        "ranks": "sim.client_ranks",
        "server_opt": f"server_opt={value}",
        "drift": f"drift={value}",
    }[axis]


def named_in(message: str, cell: Cell) -> frozenset[Value]:
    """The cell's values a refusal names (a default value, e.g. privacy=off, is never one). A method is also named
    by a key of its own (`strategy.init` for Fed-SB): its default, refused with the other value."""
    defaults = {axis: values[0] for axis, values in axes().items() if axis != "strategy"}
    found = set()
    for axis, value in cell.items():
        if defaults.get(axis) == value:
            continue
        keys = [key_of(axis, value)]
        if axis == "strategy":
            own = set(strategies.get_strategy(value).schema.__dataclass_fields__) - set(
                StrategyConfig.__dataclass_fields__
            )
            keys += [f"strategy.{f}" for f in sorted(own)]
        if any(re.search(re.escape(k) + r"(?!\w)", message) for k in keys):
            found.add((axis, value))
    return frozenset(found)


@dataclass
class Outcome:
    """One composed cell: None or the refusal's message, what it named, and the compose's wall seconds."""

    cell: Cell
    refusal: str | None
    seconds: float
    named: frozenset[Value] = frozenset()


@dataclass
class Matrix:
    """The covering's outcomes; `refused` maps each learned rule (the values refused together) to its outcome."""

    axes: dict[str, tuple[str, ...]]
    outcomes: list[Outcome] = field(default_factory=list)
    refused: dict[frozenset[Value], Outcome] = field(default_factory=dict)
    unreachable: list[Pair] = field(default_factory=list)  # pairs no cell can hold without a refused rule

    def composed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.refusal is None]

    def status(self, a: Value, b: Value) -> Outcome | None:
        """A composed cell holding both values, or the refusal of exactly this pair, or None (unreachable)."""
        for o in self.composed():
            if o.cell[a[0]] == a[1] and o.cell[b[0]] == b[1]:
                return o
        return self.refused.get(frozenset((a, b)))


def pairs(ax: dict[str, tuple[str, ...]]) -> list[Pair]:
    """Every pair of values of two different axes, in axis then value order."""
    out = []
    for (a, va), (b, vb) in itertools.combinations(list(ax.items()), 2):
        out += [frozenset({(a, x), (b, y)}) for x in va for y in vb]
    return out


def _learn(named: frozenset[Value], cell: Cell) -> frozenset[Value]:
    """The rule a refusal teaches: the values it named (a method dropped from a triple of others); all of the
    cell's values when it named fewer than two (a message that does not name its keys: the test fails on it)."""
    if len(named) > 2 and any(a == "strategy" for a, _ in named):
        named = frozenset(v for v in named if v[0] != "strategy")
    return named if len(named) >= 2 else frozenset(cell.items())


def _build(seed: Pair, ax: dict[str, tuple[str, ...]], open_pairs: dict[Pair, None], rules: list[Pair]) -> Cell | None:
    """A cell holding `seed` and no refused rule, each other axis (in order) tried first at the value that settles
    most open pairs (the default on a tie), backtracking where a later axis has no allowed value; None if none."""
    order = [axis for axis in ax if axis not in dict(seed)]

    def allowed(c: Cell) -> bool:
        values = set(c.items())
        return not any(rule <= values for rule in rules)

    def fill(cell: Cell, rest: list[str]) -> Cell | None:
        if not rest:
            return cell
        axis = rest[0]
        gains = [
            (-sum(frozenset({(axis, v), w}) in open_pairs for w in cell.items()), i) for i, v in enumerate(ax[axis])
        ]
        for _, i in sorted(gains):
            trial = {**cell, axis: ax[axis][i]}
            if allowed(trial) and (done := fill(trial, rest[1:])) is not None:
                return done
        return None

    start: Cell = dict(seed)
    cell = fill(start, order) if allowed(start) else None
    return None if cell is None else {axis: cell[axis] for axis in ax}


def cover(base: Sequence[str] = BASE, *, compose_fn: Callable[[list[str]], object] = compose) -> Matrix:
    """Compose cells until every pair of axis values is in a composed cell or refused together (or unreachable).

    Parameters
    ----------
    base : list of str
        Overrides every cell composes with (e.g. the tests' tiny model).
    compose_fn : callable
        The compose to run (`fl.app.config.compose`); a ValueError is a refusal, anything else propagates.
    """
    ax = axes()
    matrix = Matrix(ax)
    open_pairs = dict.fromkeys(pairs(ax))
    rules: list[Pair] = []
    while open_pairs:
        seed = next(iter(open_pairs))
        cell = _build(seed, ax, open_pairs, rules)
        if cell is None:
            matrix.unreachable.append(seed)
            del open_pairs[seed]
            continue
        start = time.perf_counter()
        try:
            compose_fn([*base, *overrides(cell)])
            refusal = None
        except ValueError as e:
            refusal = str(e)
        outcome = Outcome(cell, refusal, time.perf_counter() - start)
        matrix.outcomes.append(outcome)
        if refusal is None:
            for v, w in itertools.combinations(cell.items(), 2):
                open_pairs.pop(frozenset((v, w)), None)
            continue
        outcome.named = named_in(refusal, cell)
        rule = _learn(outcome.named, cell)
        rules.append(rule)
        matrix.refused[rule] = outcome
        open_pairs.pop(rule, None)
    return matrix


@dataclass(frozen=True)
class Run:
    """A composed cell run for real: with the scaling attack (`sim.attack=scale sim.attackers=1`) or not, and
    stopped after round 1 and resumed to round 2 or not."""

    cell: Cell
    attack: bool
    resume: bool


def runs_for(matrix: Matrix, strategy: str) -> list[Run]:
    """Composed cells of `strategy` holding every value it composes with at least once (greedy), the attack on
    every other one, and resume on the one with the most values off their default."""
    cells = [o.cell for o in matrix.composed() if o.cell["strategy"] == strategy]
    need = {v for c in cells for v in c.items()}
    chosen: list[Cell] = []
    while need:
        best = max(cells, key=lambda c: len(need & set(c.items())))
        chosen.append(best)
        need -= set(best.items())
    defaults = {axis: values[0] for axis, values in matrix.axes.items()}
    busiest = max(range(len(chosen)), key=lambda i: sum(chosen[i][a] != defaults[a] for a in defaults), default=0)
    return [Run(c, attack=i % 2 == 1, resume=i == busiest) for i, c in enumerate(chosen)]


def markdown(matrix: Matrix, runtime: str) -> str:
    """docs/composition.md: the method-by-value table, the refused pairs of other axes, the reasons, the runs."""
    ax = matrix.axes
    columns = [(a, v) for a, values in ax.items() if a != "strategy" for v in values[1:]]
    reasons: dict[str, int] = {}

    def mark(a: Value, b: Value) -> str:
        found = matrix.status(a, b)
        if found is None:
            return "–"
        if found.refusal is None:
            return "✓"
        return f"✗{reasons.setdefault(found.refusal, len(reasons) + 1)}"

    n_ok, n_ref = len(matrix.composed()), len(matrix.outcomes) - len(matrix.composed())
    secs = [o.seconds for o in matrix.outcomes]
    lines = [
        "# What composes with what",
        "",
        "Generated by `python -m simulations.composition` from the registries (methods, defences, server",
        "optimizers, drift controls); tested by `tests/test_composition.py`. Every pair of values of two axes is",
        "either in a cell that composes (✓) or refused at compose with a message naming both keys (✗n: reason n",
        "below); – where no cell can hold the pair because each value is refused with something the pair needs.",
        "",
        f"Covering: {len(matrix.outcomes)} cells composed of the {_product(ax):,} in the full product "
        f"({n_ok} compose, {n_ref} refused; {sum(secs):.0f} s, {sum(secs) / max(1, len(secs)):.2f} s a compose).",
        "Attack (`sim.attack=scale sim.attackers=1`) and resume are not read at compose: every composed method",
        "runs with and without them in the test (below).",
        "",
        "## Each method with each value",
        "",
        "| strategy | " + " | ".join(f"{a}={v}" if a != "ranks" else "mixed ranks" for a, v in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for s in ax["strategy"]:
        lines.append(f"| {s} | " + " | ".join(mark(("strategy", s), c) for c in columns) + " |")
    others = [(a, b) for a, b in itertools.combinations(columns, 2) if a[0] != b[0] and (mark(a, b) != "✓")]
    lines += ["", "## Other pairs that do not compose", ""]
    lines += [f"- `{_key(a)}` with `{_key(b)}`: {mark(a, b)}" for a, b in others] or ["(none)"]
    lines += ["", "## Reasons (the refusal's own message)", ""]
    lines += [f"{n}. {text}" for text, n in sorted(reasons.items(), key=lambda kv: kv[1])]
    lines += ["", "## The runs", ""]
    lines.append(
        "Each method's runs (1 round on the tiny model, 3 clients, the real ServerApp and ClientApp in-process;"
    )
    lines.append("`+attack`: one client scales its update; `+resume`: stopped after round 1, resumed to round 2):")
    lines.append("")
    for s in ax["strategy"]:
        cells = ["`" + " ".join(_run_text(r)) + "`" for r in runs_for(matrix, s)]
        lines.append(f"- {s}: " + ", ".join(cells))
    lines += ["", "## Runtime", "", runtime.strip(), ""]
    return "\n".join(lines)


def _product(ax: dict[str, tuple[str, ...]]) -> int:
    n = 1
    for values in ax.values():
        n *= len(values)
    return n


def _key(v: Value) -> str:
    return MIXED_RANKS if v[0] == "ranks" else key_of(*v)


def _run_text(run: Run) -> list[str]:
    words = [w for w in overrides(run.cell)[1:] if not w.startswith("strategy.defence_bound")] or ["defaults"]
    return words + (["+attack"] if run.attack else []) + (["+resume"] if run.resume else [])


def _kept_runtime(path: Path) -> str:
    """The Runtime section of an existing docs/composition.md (measured by hand; kept when the table is rewritten)."""
    if not path.is_file():
        return "(not measured yet)"
    text = path.read_text(encoding="utf-8")
    return text.split("## Runtime", 1)[1] if "## Runtime" in text else "(not measured yet)"


def main(argv: Sequence[str] | None = None) -> None:
    """Compose the covering and write the markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DOC)
    parser.add_argument("--runtime", default=None, help="the Runtime section's text (default: keep the file's)")
    args = parser.parse_args(argv)
    set_quiet_env()
    matrix = cover()
    args.out.write_text(markdown(matrix, args.runtime or _kept_runtime(args.out)), encoding="utf-8")
    print(f"{args.out}: {len(matrix.outcomes)} cells, {len(matrix.composed())} compose")


if __name__ == "__main__":
    main()
