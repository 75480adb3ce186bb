"""What each defence buys against each attack, and what it costs on a clean run.

Usage::

    bash dev.sh python -m simulations.bench_robust --dir multirun/robust          # the grid below (~35 runs)
    python -m simulations.bench_robust --dir /tmp/robust-smoke --smoke --limit 2    # a tiny-model check of the path

The federation: MiniLM on the tweets, 10 clients, Dirichlet α=0.5, 5 rounds × 10 local steps, every client
every round, each method at its YAML rate. The grid:

1. FFA-LoRA: attacks {none; 1 of 10 scaling ×100; 3 of 10 sign-flipping; 3 of 10 label-flipping; 1 of 10
   claiming 100× its examples} × defences {none, norm_bound (median of the round), trimmed_mean (cut 0.3),
   median, krum (f = 3), multikrum (f = 3, keeps 7)}; `--defences` runs step 1 for some of them only.
   Every defence cell also caps claimed counts at the round's median (`strategy.max_examples_weight=median`);
   the `none` cell has no cap.
2. FedIT and Fed-SB on {none, scaling} × {none, the best defence of step 1 (`--best` to fix it)}.
3. A second seed for the headline cells (FFA-LoRA {none, scaling} × {none, best}).

Each cell is an ordinary run folder under `<dir>/cells/`, run by the harness's sweep (`simulations.sweep`) as
its own `fl-sim` process: re-running the same command skips finished cells, a failing one is recorded and the rest
go on. Writes `<dir>/robust.md` (the tables and the benchmark's goals, met or not, with the numbers) and
`robust.json`. The goals: with no defence, 1 of 10 clients scaling its update ×100 drives FFA-LoRA to the majority
class; the best defence keeps every attack within 3 points of the clean run; a defence costs at most 1 point on a
clean run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations import harness

COMMON = ["sim.num_clients=10", "data.alpha=0.5", "sim.rounds=5", "train.local_steps=10", "sim.fraction_train=1.0"]
SMOKE = [
    *harness.TINY,
    "sim.rounds=2",
    "train.local_steps=2",
    "train.batch_size=8",
    "strategy.rank=2",
    "strategy.init=random",
]
ATTACKS: dict[str, list[str]] = {
    "none": [],
    "scale x100 (1/10)": ["sim.attack=scale", "sim.attackers=1", "sim.attack_strength=100"],
    "sign flip (3/10)": ["sim.attack=sign_flip", "sim.attackers=3", "sim.attack_strength=1"],
    "label flip (3/10)": ["sim.attack=label_flip", "sim.attackers=3"],
    "claims 100x (1/10)": ["sim.attack=num_examples", "sim.attackers=1", "sim.attack_strength=100"],
}
CAP = ["strategy.max_examples_weight=median"]
DEFENCES: dict[str, list[str]] = {
    "none": [],
    "norm_bound": ["strategy.defence=norm_bound", "strategy.defence_bound=median", *CAP],
    "trimmed_mean": ["strategy.defence=trimmed_mean", "strategy.trim_fraction=0.3", *CAP],
    "median": ["strategy.defence=median", *CAP],
    "krum": ["strategy.defence=krum", "strategy.krum_f=3", *CAP],
    "multikrum": ["strategy.defence=multikrum", "strategy.krum_f=3", *CAP],  # keeps n - f = 7 of 10
}
HEADLINE = ["none", "scale x100 (1/10)"]
MAJORITY = 0.42  # the tweets' majority class (DESIGN.md): "near" it = within 5 points


def cell(strategy: str, attack: str, defence: str, seed: int, smoke: bool) -> list[str]:
    """One run's overrides."""
    extra = [o for o in SMOKE if strategy == "fed_sb" or not o.startswith("strategy.init")] if smoke else []
    return [f"strategy={strategy}", *COMMON, *extra, *ATTACKS[attack], *DEFENCES[defence], f"seed={seed}"]


def grid(best: str | None, smoke: bool, defences: list[str] | None = None) -> list[tuple[str, str, str, int]]:
    """(strategy, attack, defence, seed) of every cell; steps 2-3 only once `best` is known."""
    cells = [("ffa_lora", a, d, 0) for a in ATTACKS for d in DEFENCES if defences is None or d in defences]
    if best is not None:
        cells += [(s, a, d, 0) for s in ("fedit", "fed_sb") for a in HEADLINE for d in ("none", best)]
        cells += [("ffa_lora", a, d, 1) for a in HEADLINE for d in dict.fromkeys(("none", best))]
    return cells


def run_cells(cells: list[tuple[str, str, str, int]], root: Path, smoke: bool) -> dict[tuple[str, str, str, int], Any]:
    """Run (or skip, when done) every cell; its final accuracy (None when it failed)."""
    finals = harness.run_cases([cell(*c, smoke) for c in cells], root)
    return {c: None if f is None else f["accuracy"] for c, f in zip(cells, finals, strict=True)}


def best_defence(acc: dict[tuple[str, str, str, int], Any]) -> str:
    """The defence of step 1 whose worst attack ends closest to the clean run."""
    clean = acc[("ffa_lora", "none", "none", 0)]
    ran = [d for d in DEFENCES if d != "none" and all(("ffa_lora", a, d, 0) in acc for a in ATTACKS)]

    def worst(d: str) -> float:
        finals = [acc[("ffa_lora", a, d, 0)] for a in ATTACKS]
        return max(clean - (f if f is not None else 0.0) for f in finals)

    return min(ran, key=worst)


def _pct(x: Any) -> str:
    return "failed" if x is None else f"{100 * x:.2f}"


def report(acc: dict[tuple[str, str, str, int], Any], best: str) -> str:
    """The tables and the goals as markdown."""
    lines = ["## FFA-LoRA: final accuracy (%) per attack × defence (seed 0)", ""]
    ran = [d for d in DEFENCES if any(("ffa_lora", a, d, 0) in acc for a in ATTACKS)]
    lines += ["| attack | " + " | ".join(ran) + " |", "|---|" + "---|" * len(ran)]
    for a in ATTACKS:
        lines.append(f"| {a} | " + " | ".join(_pct(acc.get(("ffa_lora", a, d, 0))) for d in ran) + " |")
    lines += ["", f"Best defence (smallest worst-case drop): **{best}**", ""]
    lines += [
        "## FedIT, Fed-SB (seed 0) and the second seed (FFA-LoRA)",
        "",
        "| method | attack | defence | seed | accuracy |",
    ]
    lines.append("|---|---|---|---|---|")
    for (s, a, d, seed), v in acc.items():
        if s != "ffa_lora" or seed == 1:
            lines.append(f"| {s} | {a} | {d} | {seed} | {_pct(v)} |")
    clean = acc[("ffa_lora", "none", "none", 0)]
    scaled = acc.get(("ffa_lora", "scale x100 (1/10)", "none", 0))
    lines += ["", "## The goals (FFA-LoRA, seed 0)", ""]
    if clean is not None and scaled is not None:
        ok = scaled <= MAJORITY + 0.05
        lines.append(
            f"- no defence, scaling: {_pct(scaled)} vs majority class {100 * MAJORITY:.0f}"
            f" → {'met' if ok else 'not met'}"
        )
        drops = {a: clean - (acc[("ffa_lora", a, best, 0)] or 0.0) for a in ATTACKS}
        ok = all(d <= 0.03 for d in drops.values())
        worst = max(drops, key=drops.__getitem__)
        lines.append(
            f"- {best}: every attack within 3 points of clean {_pct(clean)}: worst {worst} "
            f"{100 * drops[worst]:+.2f} → {'met' if ok else 'not met'}"
        )
        for d in ran:
            if d != "none":
                cost = clean - (acc[("ffa_lora", "none", d, 0)] or 0.0)
                lines.append(
                    f"- {d} on a clean run costs {100 * cost:.2f} points → {'met' if cost <= 0.01 else 'not met'}"
                )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m simulations.bench_robust --dir DIR [--best DEFENCE] [--smoke] [--limit N] [--defences ...]`."""
    ap = harness.parser(__doc__, prog="bench_robust")
    ap.add_argument("--dir", type=Path, default=Path("multirun/robust"), help="the sweep folder (resumable)")
    ap.add_argument("--best", choices=[d for d in DEFENCES if d != "none"], help="skip choosing it from step 1")
    harness.add_tiny(ap, "--smoke", "--tiny", help="tiny random model, 2 rounds: checks the path only")
    ap.add_argument("--limit", type=int, help="run only the first N cells of step 1 (with --smoke)")
    ap.add_argument(
        "--defences",
        nargs="+",
        choices=list(DEFENCES),
        help="step 1 with these defences only (and none), then its table: no steps 2-3",
    )
    args = harness.parse(ap, argv)
    only = None if args.defences is None else ["none", *args.defences]
    step1 = grid(None, args.tiny, only)
    step1 = step1[: args.limit] if args.limit else step1
    acc = run_cells(step1, args.dir, args.tiny)
    if only is not None and not args.limit:
        text = report(acc, args.best or best_defence(acc))
        harness.write_text(args.dir / "robust-step1.md", text)
        print(text)
        return
    if args.limit:
        print(json.dumps({" / ".join(map(str, k)): v for k, v in acc.items()}, indent=2))
        return
    best = args.best or best_defence(acc)
    acc = run_cells(grid(best, args.tiny), args.dir, args.tiny)
    text = report(acc, best)
    harness.write_text(args.dir / "robust.md", text)
    harness.write_json(args.dir / "robust.json", {" / ".join(map(str, k)): v for k, v in acc.items()})
    print(text)


if __name__ == "__main__":
    main()
