"""The privacy–utility map: accuracy at ε = 3 and without DP over clients × DP steps per client.

Grid: methods (FFA-LoRA, FedIT, Fed-SB, each with its ``privacy=dp_<method>`` preset at the rate pinned in
`MAP_RATES`) × clients {3, 10} (≈12k and ≈3.6k tweets each on average: the default Dirichlet α = 0.5 partitioning,
so 4.8k–19k at 3 clients) × DP steps per client {≈9, ≈50, ≈150} (``privacy.local_steps`` × rounds, the budget planned
for every round) at ε = 3, each with its non-DP twin at the same logical batch and steps; then ε ∈ {1, 8} at the
best ε = 3 cell of each method. Every finished cell is one JSON line in ``--out``; a second invocation skips the
cells already there, so the map survives being stopped (resumable). ``--report`` prints the table (accuracy, its
twin, the gap, σ, DP steps, wall time; PRV's ε and σ beside RDP's) and writes the plot.

Order: the cells run by DP steps first (all methods and client counts at ≈9 steps, then ≈50, then ≈150), so a map
stopped part-way has whole columns. ``--estimate`` prints each cell's examples and the expected hours.

Cost, and the logical batch: a cell trains on clients × DP steps × batch examples (its twin on as many). At the
presets' logical batch of 256 the grid is ~4.2M examples per arm, about 27 h of these 2 cores at the measured
32–70 examples/s; at 64 (the default here) it is about a quarter of that, which is what fits the ~6 h asked for.
The presets' σ, lr and clip were tuned at 256 and 9 steps; at 64 each step is noisier (σC/B), so the ≈9-step
cells here are not the published 9-step figures (BENCHMARKS.md, "The DP grid"), which ran at 256.

``--paper``: the Fed-SB paper's private regime in shape (Singhal et al. 2025, private BERT-base/SNLI, read from
the authors' fed_sb/DP code): 3 IID clients, several local epochs and one aggregation, logical batch 32, C = 0.1,
ghost clipping, AdamW lr 5e-4, adapters on query/value, the classifier head trained and privatised with the
adapter; Fed-SB r = 64 with its init (a) from a public slice of 550 tweets no client holds, not charged to ε,
as the authors do, and (b) federated and charged (our default). What still differs from the paper: MiniLM-L6
and 3 × ~12k tweets instead of BERT-base and 3 × ~183k SNLI pairs; ``--paper-epochs`` (default 2) instead of
6; δ below 1/n_k instead of 1/(number of batches), ~100× tighter.

Usage::

    python -m simulations.bench_dp_map --out runs/dp_map.jsonl            # the MiniLM map (hours on 2 cores)
    python -m simulations.bench_dp_map --tiny --out /tmp/map.jsonl        # smoke test on the tiny model
    python -m simulations.bench_dp_map --out runs/dp_map.jsonl --report   # table + plot of what has finished
    python -m simulations.bench_dp_map --out runs/dp_map.jsonl --estimate # examples and hours per cell
    python -m simulations.bench_dp_map --out runs/dp_paper.jsonl --paper  # the paper's regime, in shape
    python -m simulations.bench_dp_map --out F --methods ffa_lora --lr 1e-2  # a rate other than the preset's
    python -m simulations.bench_dp_map --out F --paper --methods fed_sb --lr 1e-2  # the paper's regime at that rate
    python -m simulations.bench_dp_map --out F --clients 10 --local-steps 50 --methods ffa_lora --lr 1e-2 \
        --variant prv --set privacy.accountant=prv      # planned with PRV (the map's cells pin RDP, as they ran)
    python -m simulations.bench_dp_map --out F ... --variant adam --set server_opt=adam server_opt.lr=1e-2
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hydra.errors import HydraException

from fl.app.config import compose
from simulations import harness
from simulations.dp_map_report import HEADLINE_EPSILON, OWN_RATE, plan_figures, plot, seeds_table, table

METHODS = ("ffa_lora", "fedit", "fed_sb", "fedsvd")
CLIENTS = (3, 10)
LOCAL_STEPS = (3, 17, 50)  # × ROUNDS = 9, 51, 150 DP steps per client
ROUNDS = 3
OTHER_EPSILONS = (1.0, 8.0)
LOGICAL_BATCH = 64  # fits the grid in ~6-7 h of 2 cores; the presets' 256 would take ~27 h (module docstring)
PHYSICAL_BATCH = 64
# Examples per second on 2 cores (bf16 EPYC, MiniLM), from the 9-step DP runs and their non-DP runs (BENCHMARKS.md,
# "The DP grid"); --estimate uses the map's own finished cells instead where it has them.
THROUGHPUT = {("ffa_lora", True): 43.0, ("fedit", True): 32.0, ("fed_sb", True): 49.0, ("fedsvd", True): 43.0}
# The methods' own non-DP constant rates (BENCHMARKS.md, "The four methods"; the study's): a DP preset's rate can be
# stable only under clipping (FFA-LoRA's 5e-2 diverged without it in the map's first cells), so --own-rate-twins
# adds a second twin at these rates and the table's gap is taken to the better twin.
NON_DP_RATES = {"ffa_lora": 1e-2, "fedit": 3e-3, "fed_sb": 1e-2, "fedsvd": 1e-2}
# The rates of the map's cells, pinned: the presets' rates when the map began (2026-12-05). The presets are chosen
# from the map and may change; a cell must mean the same run whenever it is (re)run. `--lr` and variants override.
# FedSVD (added 2026-12-06) trains FFA-LoRA's B against an A that is FFA-LoRA's random A in round 1 and an orthonormal
# basis after it (row norm 1 vs ~0.58): FFA-LoRA's rates, not tuned for it; its throughput is FFA-LoRA's estimate.
MAP_RATES = {"ffa_lora": 5e-2, "fedit": 3e-3, "fed_sb": 1e-2, "fedsvd": 5e-2}
THROUGHPUT_NON_DP = {"ffa_lora": 70.0, "fedit": 60.0, "fed_sb": 30.0, "fedsvd": 70.0}
EXAMPLES = {3: 12_000, 10: 3_600}  # ≈ tweets per client

PAPER_EPOCHS = 2.0
PAPER_BATCH = 32
PAPER_COMMON = (
    "data.partitioner=iid",
    "model.target_modules=[query,value]",
    "strategy.lr=5e-4",
    "privacy.grad_sample_mode=ghost",
    "privacy.max_grad_norm=0.1",
)
# (method, variant, extra overrides): Fed-SB's init from a public slice (uncharged) and federated (charged).
# The server init draws init_examples x clients of the public slice: here all 550, as the authors'. (Variant
# "paper-init-public", run 2026-12-05, drew 64 x 3 = 192; renamed, as a cell's key omits its overrides.)
PAPER_CLIENTS, PAPER_PUBLIC = 3, 550
PAPER_RUNS = (
    ("ffa_lora", "paper", ()),
    ("fedit", "paper", ()),
    (
        "fed_sb",
        "paper-init-public550",
        (
            "strategy.init=server",
            "strategy.init_data=public",
            f"data.public_size={PAPER_PUBLIC}",
            f"strategy.init_examples={math.ceil(PAPER_PUBLIC / PAPER_CLIENTS)}",
        ),
    ),
    ("fed_sb", "paper-init-federated", ("strategy.init=federated",)),
)


@dataclass(frozen=True)
class Cell:
    """One run of the map: a method, a client count, local steps (or epochs) per round, and ε (None: the non-DP
    twin). A `variant` (the paper regime's) adds its own `extra` overrides and its own logical `batch`."""

    method: str
    clients: int
    local_steps: int | None
    epsilon: float | None
    rounds: int = ROUNDS
    seed: int = 0
    local_epochs: float | None = None
    variant: str = ""
    extra: tuple[str, ...] = ()
    batch: int | None = None  # None: the map's --batch

    @property
    def key(self) -> str:
        eps = "off" if self.epsilon is None else f"eps{self.epsilon:g}"
        work = f"s{self.local_steps}" if self.local_epochs is None else f"e{self.local_epochs:g}"
        name = f"{self.variant}-{self.method}" if self.variant else self.method
        return f"{name}-c{self.clients}-{work}x{self.rounds}-{eps}-seed{self.seed}"

    @property
    def dp_steps(self) -> int | None:
        """Planned DP steps per client; None for epochs (the run reports the steps it took)."""
        return None if self.local_steps is None else self.local_steps * self.rounds

    def examples(self, batch: int) -> float:
        """Examples trained on, all clients together (≈: the partitions are near equal)."""
        b = self.batch or batch
        if self.local_epochs is None:
            return float(self.clients * (self.dp_steps or 0) * b)
        return self.clients * self.local_epochs * self.rounds * EXAMPLES.get(self.clients, 36_000 / self.clients)

    def overrides(self, *, batch: int, physical: int) -> list[str]:
        """The Hydra overrides of this cell: the method's DP preset, with DP off for the twin."""
        b = self.batch or batch
        common = [
            f"strategy={self.method}",
            f"privacy=dp_{self.method}",
            f"sim.num_clients={self.clients}",
            f"sim.rounds={self.rounds}",
            "sim.fraction_train=1.0",
            f"seed={self.seed}",
            *([f"strategy.lr={MAP_RATES[self.method]:g}"] if self.method in MAP_RATES else []),
            # pinned: every cell before 2026-12-06 was planned with RDP (PRV is the default since); a key must mean
            # the same run whenever it is (re)run. PRV's cells are a variant: --variant prv --set privacy.accountant=prv
            "privacy.accountant=rdp",
            # pinned too: every cell so far ran in fp32 (CPUs without native bf16, where precision=auto is fp32); on
            # a bf16 CPU `auto` would train under bf16 autocast and a resumed map would mix the two under one key
            "train.precision=fp32",
            *self.extra,  # after the pinned rate and accountant: the last value of a key wins
        ]
        work = "epochs" if self.local_epochs is not None else "steps"
        amount = self.local_epochs if self.local_epochs is not None else self.local_steps
        if self.epsilon is None:  # same logical batch and steps, no clipping or noise
            return [*common, "privacy.enabled=false", f"train.batch_size={b}", f"train.local_{work}={amount}"]
        return [
            *common,
            f"privacy.target_epsilon={self.epsilon:g}",
            f"privacy.batch_size={b}",
            f"privacy.physical_batch={min(physical, b)}",
            f"privacy.local_{work}={amount}",
            f"privacy.planned_rounds={self.rounds}",
        ]


def grid(
    methods: Iterable[str] = METHODS,
    clients: Iterable[int] = CLIENTS,
    local_steps: Iterable[int] = LOCAL_STEPS,
    *,
    rounds: int = ROUNDS,
    seeds: Iterable[int] = (0,),
) -> list[Cell]:
    """The ε = 3 cells and their non-DP twins, by DP steps first (a map stopped part-way has whole columns)."""
    return [
        Cell(m, c, s, e, rounds, seed)
        for s in local_steps
        for seed in seeds
        for c in clients
        for m in methods
        for e in (HEADLINE_EPSILON, None)
    ]


def with_own_rate_twins(cells: Iterable[Cell]) -> list[Cell]:
    """The cells, each grid twin followed by a second twin at the method's own non-DP rate (`NON_DP_RATES`)."""
    out = []
    for cell in cells:
        out.append(cell)
        if cell.epsilon is None and not cell.variant:
            if cell.method not in NON_DP_RATES:
                raise ValueError(
                    f"--own-rate-twins: no non-DP rate for method {cell.method!r}; add it to NON_DP_RATES "
                    f"(known: {', '.join(sorted(NON_DP_RATES))}) or run without --own-rate-twins"
                )
            lr = f"strategy.lr={NON_DP_RATES[cell.method]:g}"
            out.append(replace(cell, variant=OWN_RATE, extra=(*cell.extra, lr)))
    return out


def at_rate(cells: Iterable[Cell], lr: float) -> list[Cell]:
    """The cells at client rate `lr` instead of their preset's, as variant ``lr<lr>`` (a DP cell's twin is the
    same variant's: FFA-LoRA's preset rate, tuned for 9 steps, fails at 150, where its non-DP rate may not)."""
    name = f"lr{lr:g}"
    return [
        replace(c, variant=f"{c.variant}-{name}" if c.variant else name, extra=(*c.extra, f"strategy.lr={lr:g}"))
        for c in cells
    ]


def with_settings(cells: Iterable[Cell], variant: str, settings: Sequence[str]) -> list[Cell]:
    """The cells with extra overrides `settings` (DP cell and twin alike) as variant `variant`: a server optimizer
    (``server_opt=adam server_opt.lr=1e-2``), FedProx (``drift=fedprox``), PRV planning (``privacy.accountant=prv``)."""
    if not variant or not settings or any("=" not in s for s in settings):
        raise ValueError(f"--variant {variant!r} --set {' '.join(settings)!r}: give a name and KEY=VALUE overrides")
    return [
        replace(c, variant=f"{c.variant}-{variant}" if c.variant else variant, extra=(*c.extra, *settings))
        for c in cells
    ]


def paper_cells(
    epochs: float = PAPER_EPOCHS, *, seed: int = 0, twins: bool = True, methods: Iterable[str] = METHODS
) -> list[Cell]:
    """The paper's regime in shape (module docstring): every method at ε = 3, then the non-DP twins."""
    return [
        Cell(m, PAPER_CLIENTS, None, e, 1, seed, epochs, variant, (*PAPER_COMMON, *extra), PAPER_BATCH)
        for e in ((HEADLINE_EPSILON, None) if twins else (HEADLINE_EPSILON,))
        for m, variant, extra in PAPER_RUNS
        if m in methods
    ]


def estimate(cells: Iterable[Cell], done: list[dict[str, Any]], *, batch: int) -> str:
    """Each cell's examples and expected hours: at the rate of the map's largest finished cell for its method and arm
    where it has one, else at THROUGHPUT's measured rates; finished cells count their wall time."""
    rate: dict[tuple[str, bool], float] = {}
    largest: dict[tuple[str, bool], float] = {}
    for row in done:  # the largest finished cell's rate: a small cell's is mostly start-up (9 steps: ~30 ex/s)
        arm = (row["method"], row["epsilon"] is not None)
        if row.get("examples") and row.get("wall_s") and row["examples"] > largest.get(arm, 0):
            rate[arm], largest[arm] = row["examples"] / row["wall_s"], row["examples"]
    walls = {row["key"]: row["wall_s"] for row in done}
    lines, total = [], 0.0
    for cell in cells:
        dp = cell.epsilon is not None
        default = THROUGHPUT.get((cell.method, dp), 40.0) if dp else THROUGHPUT_NON_DP.get(cell.method, 60.0)
        hours = (
            walls[cell.key] / 3600
            if cell.key in walls
            else cell.examples(batch) / rate.get((cell.method, dp), default) / 3600
        )
        total += hours
        name = f"{cell.key}{' (done)' if cell.key in walls else ''}"
        lines.append([name, f"{cell.examples(batch):,.0f}", f"{hours:.2f}"])
    lines.append(["total", "", f"{total:.1f}"])
    return harness.md_table(["cell", "examples", "hours"], lines).rstrip("\n")


def best_cells(done: Iterable[dict[str, Any]]) -> list[Cell]:
    """ε ∈ {1, 8} at each method's best ε = 3 cell (by final accuracy) among finished rows."""
    best: dict[str, dict[str, Any]] = {}
    for row in done:
        if row.get("variant"):  # the paper regime is not a cell of the grid
            continue
        if row["epsilon"] == HEADLINE_EPSILON and row["accuracy"] > best.get(row["method"], {}).get("accuracy", -1):
            best[row["method"]] = row
    return [
        Cell(r["method"], r["clients"], r["local_steps"], e, r["rounds"], r["seed"])
        for r in best.values()
        for e in OTHER_EPSILONS
    ]


Runner = Callable[[Cell, list[str]], dict[str, Any]]


def simulate(cell: Cell, overrides: list[str]) -> dict[str, Any]:
    """Run one cell as a simulation; its final accuracy, ε, σ and DP steps (from the run's own files)."""
    run = harness.simulate(overrides, prefix=f"dp-map-{cell.key}-")
    return {
        "accuracy": run.final["accuracy"],
        "wall_s": run.wall_s,
        "run_dir": str(run.run_dir),
        "epsilon_max": max((r.get("epsilon_max") or 0.0) for r in run.rows),
        "dp_steps_taken": max((r.get("dp_steps_max") or 0) for r in run.rows),
        **plan_figures(run.run_dir / "privacy_plan.json"),
    }


def run_map(cells: Iterable[Cell], out: Path, *, runner: Runner, batch: int, physical: int) -> list[dict[str, Any]]:
    """Run the cells not yet in `out`, appending one JSON line per finished cell; returns every row."""
    done = harness.read_jsonl(out)
    keys = {row["key"] for row in done}
    for cell in cells:
        if cell.key in keys:
            continue
        result = runner(cell, cell.overrides(batch=batch, physical=physical))
        row = {"key": cell.key, **asdict(cell), "dp_steps": cell.dp_steps, "examples": cell.examples(batch), **result}
        harness.append_jsonl(out, row)
        done.append(row)
        keys.add(cell.key)
        print(json.dumps(row), flush=True)
    return done


def main(argv: Sequence[str] | None = None) -> None:
    """Run the grid (or the paper's regime) resumably into ``--out``; or only report or estimate it."""
    ap = harness.parser(__doc__)
    ap.add_argument("--out", type=Path, required=True, help="results, one JSON line per finished cell")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)  # the rates pinned in MAP_RATES
    ap.add_argument("--clients", type=int, nargs="*", default=list(CLIENTS))
    ap.add_argument("--local-steps", type=int, nargs="*", default=list(LOCAL_STEPS))
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    harness.add_seeds(ap, nargs="*")
    ap.add_argument("--batch", type=int, default=LOGICAL_BATCH)
    ap.add_argument("--physical-batch", type=int, default=PHYSICAL_BATCH)
    harness.add_tiny(ap, "--tiny", "--smoke", help="smoke test on the tiny model (harness.TINY overrides)")
    ap.add_argument("--skip-other-eps", action="store_true", help="only the ε = 3 cells and their twins")
    ap.add_argument("--report", action="store_true", help="print the table and write <out>.png; run nothing")
    ap.add_argument("--estimate", action="store_true", help="print each cell's examples and hours; run nothing")
    ap.add_argument("--paper", action="store_true", help="the Fed-SB paper's private regime in shape, not the grid")
    ap.add_argument("--paper-epochs", type=float, default=PAPER_EPOCHS, help="--paper: local epochs (one round)")
    ap.add_argument("--no-twins", action="store_true", help="the DP runs only (e.g. a second seed of a cell)")
    ap.add_argument(
        "--lr", type=float, help="every cell (DP and twin) at this client rate instead of the preset's (variant lr<X>)"
    )
    ap.add_argument(
        "--own-rate-twins", action="store_true", help="a second non-DP twin per cell at the method's own rate"
    )
    ap.add_argument("--variant", default="", help="with --set: the name of the cells these overrides make")
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="with --variant: overrides added to every cell, DP and twin (e.g. server_opt=adam server_opt.lr=1e-2)",
    )
    args = harness.parse(ap, argv)
    if args.report:
        rows = harness.read_jsonl(args.out)
        print(table(rows))
        print("\nOver seeds (mean ± std; the gap over the seeds that have both arms):\n")
        print(seeds_table(rows))
        if any(r.get("dp_steps") for r in rows):
            plot(rows, args.out.with_suffix(".png"))
        return
    if args.paper and args.own_rate_twins:
        ap.error("--own-rate-twins is for the grid: --paper's twins already run at the paper's rate (use --lr)")
    extra = harness.TINY if args.tiny else []
    if args.paper:
        cells = paper_cells(args.paper_epochs, seed=args.seeds[0], twins=not args.no_twins, methods=args.methods)
    else:
        cells = grid(args.methods, args.clients, args.local_steps, rounds=args.rounds, seeds=args.seeds)
    if args.lr is not None:  # --paper --lr: the paper's regime at a rate of the map's (variant paper…-lr<X>)
        cells = at_rate(cells, args.lr)
    if args.variant or args.set:
        try:
            cells = with_settings(cells, args.variant, args.set)
            compose([*extra, *cells[0].overrides(batch=args.batch, physical=args.physical_batch)])
        except (ValueError, HydraException) as exc:  # a typo in --set fails here, naming the key, before any run
            ap.error(f"--variant/--set: {exc}")
    if args.own_rate_twins:
        cells = with_own_rate_twins(cells)
    if args.no_twins:
        cells = [c for c in cells if c.epsilon is not None]
    if args.estimate:
        print(estimate(cells, harness.read_jsonl(args.out), batch=args.batch))
        return

    def runner(cell: Cell, overrides: list[str]) -> dict[str, Any]:
        return simulate(cell, [*extra, *overrides])

    kw = {"runner": runner, "batch": args.batch, "physical": args.physical_batch}
    done = run_map(cells, args.out, **kw)
    if not args.skip_other_eps and not args.paper:
        run_map(best_cells(done), args.out, **kw)
    print(table(harness.read_jsonl(args.out)))


if __name__ == "__main__":
    main()
