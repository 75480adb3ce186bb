"""Shared fixtures: quiet offline environment, a tiny config, a per-session data cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fl.runtime_env import set_quiet_env

set_quiet_env()
os.environ.setdefault("FLWR_HOME", str(Path(__file__).resolve().parent.parent / ".flwr"))

TINY = [
    "model=tiny",
    "data.max_examples=600",
    "data.test_size=100",
    "data.val_size=100",  # the validation split every choice reads (fl.data.val_order), as small as the test split
    "data.max_length=32",
    "train.local_steps=2",
    "train.batch_size=8",
    "train.eval_batch_size=64",
    "train.precision=fp32",  # tests compare numbers to float tolerance; bf16 has its own tests (test_accel.py)
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tokenised-data cache for the whole test session."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_overrides(cache_dir: str, tmp_path: Path) -> list[str]:
    """Overrides for a tiny, fast run writing into a temporary run folder."""
    return [*TINY, f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}"]


@pytest.fixture(scope="session")
def tiny(cache_dir: str) -> list[str]:
    """The tiny-run overrides (no run_dir), with the session's data cache."""
    return [*TINY, f"cache_dir={cache_dir}"]


TINY_SWEEP = ["sim.rounds=1", "data.partitioner=iid", "strategy=fedit,ffa_lora", "sim.num_clients=2,3"]


@pytest.fixture(scope="session")
def tiny_sweep(tiny: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One real 4-cell `fl-sweep` (FedIT, FFA-LoRA × 2, 3 clients; one round), shared by test_sweep.py and
    test_study_report.py: each cell is its own `fl-sim` process on Ray (~30 s each), so it runs once."""
    from simulations.sweep import run_sweep

    sweep_dir = tmp_path_factory.mktemp("sweep")
    overrides = [*tiny, *TINY_SWEEP]
    record = run_sweep(overrides, sweep_dir)
    assert all(c["status"] == "done" for c in record["cells"].values())
    return sweep_dir, overrides


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Torch on one thread for in-process runs (tiny matrices: ~5x faster on 2 loaded cores), then as before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
