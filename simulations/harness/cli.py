"""A benchmark's command line: one parser and the flags benchmarks share, with each benchmark's own defaults.

argparse, not Hydra, parses a benchmark's own flags: they choose a grid of runs, and each run's config is
still composed by Hydra from the overrides the benchmark builds (`federation`, `TINY`, ``--extra``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fl.runtime_env import set_quiet_env

# The tiny random model on a small slice of the tweets: a benchmark's smoke path checks its code, not a figure.
TINY = [
    "model=tiny",
    "data.max_examples=600",
    "data.test_size=100",
    "data.max_length=32",
    "train.eval_batch_size=64",
    "train.precision=fp32",
]
# The federation the recorded method comparisons share: Dirichlet α = 0.5, a constant client rate, fp32.
FEDERATION = ["data.partitioner=dirichlet", "data.alpha=0.5"]
RECORDED = ["train.lr_schedule=constant", "train.precision=fp32"]


def parser(doc: str | None, *, prog: str | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first line of its module docstring."""
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])


def add_federation(
    ap: argparse.ArgumentParser, *, rounds: int, local_steps: int, clients: int, test_size: int | None = None
) -> None:
    """``--rounds --local-steps --clients`` (and ``--test-size`` when given a default): the simulated federation."""
    ap.add_argument("--rounds", type=int, default=rounds, help="federated rounds per run")
    ap.add_argument("--local-steps", type=int, default=local_steps, help="client optimiser steps per round")
    ap.add_argument("--clients", type=int, default=clients, help="simulated clients, every one each round")
    if test_size is not None:
        ap.add_argument("--test-size", type=int, default=test_size, help="held-out test examples")


def add_timing(ap: argparse.ArgumentParser, *, steps: int, chunks: int, steps_help: str = "steps per chunk") -> None:
    """``--steps --chunks``: a timed arm's steps per chunk, and how many chunks the arms alternate over."""
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--chunks", type=int, default=chunks, help="alternating chunks (arms reversed every other one)")


def add_seeds(ap: argparse.ArgumentParser, *, default: Sequence[int] = (0,), nargs: str = "+") -> None:
    """``--seeds``: every run of the grid once per seed."""
    ap.add_argument("--seeds", type=int, nargs=nargs, default=list(default), help="run every cell with each seed")


def add_extra(ap: argparse.ArgumentParser) -> None:
    """``--extra``: Hydra overrides added to every run (last of a key wins), e.g. ``model=tiny`` for a smoke run."""
    ap.add_argument(
        "--extra", nargs="*", default=[], help="more overrides for every run, e.g. train.lr_schedule=cosine"
    )


def add_tiny(ap: argparse.ArgumentParser, *flags: str, help: str) -> None:
    """The smoke path's flag(s), stored as ``args.tiny``: the benchmark runs its grid on `TINY`."""
    ap.add_argument(*(flags or ("--tiny",)), dest="tiny", action="store_true", help=help)


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Set the quiet environment every entry point sets (before Flower or Ray start) and parse `argv`."""
    set_quiet_env()
    return ap.parse_args(argv)


def federation(args: argparse.Namespace) -> list[str]:
    """The overrides of ``add_federation``'s flags on the recorded federation, then ``--extra`` (which wins)."""
    return [
        f"sim.num_clients={args.clients}",
        f"sim.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        *FEDERATION,
        f"data.test_size={args.test_size}",
        *RECORDED,
        *getattr(args, "extra", []),
    ]
