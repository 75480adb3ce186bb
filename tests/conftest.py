"""Shared fixtures: quiet offline environment, a tiny config, a per-session data cache.

`bash dev.sh test` runs the suite on three pytest-xdist workers (`-n 3 --dist loadscope`): a module's tests run on
one worker, so a module-scoped run happens once (a fixture that several modules read would run on each worker:
share runs within a module). Each worker has its own FLWR_HOME and temporary folders (every run also keeps its
own FLWR_HOME, and every Flower process binds a port the OS picks); the workers share the data cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fl.runtime_env import set_quiet_env

set_quiet_env()
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under pytest-xdist; unset in a plain run
_home = Path(os.environ.get("FLWR_HOME") or Path(__file__).resolve().parent.parent / ".flwr")
os.environ["FLWR_HOME"] = str(_home / WORKER if WORKER else _home)

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
    # A simulation's local Ray gets one CPU, hence one ClientApp actor: each actor imports torch, transformers,
    # PEFT and Opacus (~9 s of CPU) to train a tiny client for ~1 s (a tiny run: 44 -> 38 s of CPU with one; the
    # suite's wall did not measurably change, BENCHMARKS.md). Clients still run on Ray, one after another.
    "sim.cpus=1",
]


@pytest.fixture(scope="session", autouse=True)
def _torch_on_one_thread() -> None:
    """Torch on one thread in the test process, as in each simulated client (`sim.client_cpus=1`): the tiny
    models' matrices gain nothing from a second thread (a golden case: 29 s instead of 57 s on 2 loaded cores),
    and the xdist workers share 2 cores without each claiming both."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One tokenised-data cache for the whole test session, shared by its xdist workers (writes are atomic)."""
    if not WORKER:
        return str(tmp_path_factory.mktemp("cache"))
    path = tmp_path_factory.getbasetemp().parent / "cache"  # the session's folder, above each worker's own
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture
def tiny_overrides(cache_dir: str, tmp_path: Path) -> list[str]:
    """Overrides for a tiny, fast run writing into a temporary run folder."""
    return [*TINY, f"cache_dir={cache_dir}", f"run_dir={tmp_path / 'run'}"]


@pytest.fixture(scope="session")
def tiny(cache_dir: str) -> list[str]:
    """The tiny-run overrides (no run_dir), with the session's data cache."""
    return [*TINY, f"cache_dir={cache_dir}"]


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Torch on one thread for in-process runs (tiny matrices: ~5x faster on 2 loaded cores), then as before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.heavy` tests (benchmark-sized: a Ray cluster, Optuna on joblib) run only with
    FEDLORA_HEAVY_TESTS=1, so the suite stays under its 25 minutes on 2 cores (docs/development.md); they keep their
    own subprocess limits (up to 1,200 s) instead of the suite's per-test timeout ([tool.pytest.ini_options])."""
    if os.environ.get("FEDLORA_HEAVY_TESTS") == "1":
        for item in items:
            if "heavy" in item.keywords:
                item.add_marker(pytest.mark.timeout(0))
        return
    skip = pytest.mark.skip(reason="heavy: run with FEDLORA_HEAVY_TESTS=1 (docs/development.md)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
