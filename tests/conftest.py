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
