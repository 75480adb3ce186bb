"""The layers of shared/DESIGN.md as checked facts: import-linter's contracts hold, the ground contract lists every
ground module, no two modules import each other (directly or through others), and no package file passes 400 lines."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fl", "strategies", "clients", "privacy", "simulations")
TOP_OF_FL = {"fl.app", "fl.deploy"}


def _contracts() -> list[dict[str, object]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_linter_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{len(_contracts())} kept, 0 broken" in done.stdout


def test_the_ground_contract_names_every_ground_module() -> None:
    ground = next(c for c in _contracts() if c["type"] == "forbidden" and "fl is the ground" in str(c["name"]))
    modules = {f"fl.{p.stem}" for p in (ROOT / "fl").glob("*.py") if p.stem != "__init__"}
    modules |= {f"fl.{p.name}" for p in (ROOT / "fl").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert "fl.constants" in modules  # the folder was read
    assert set(ground["source_modules"]) == modules - TOP_OF_FL  # type: ignore[arg-type]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_between_modules(package: str) -> None:
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    modules = sorted(m for m in graph.modules if m.split(".")[0] == package)
    for module in modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith(module + ".") or module.startswith(imported + "."):
                continue  # a package and its own submodules
            back = graph.find_shortest_chain(importer=imported, imported=module)
            assert back is None, f"import cycle: {module} -> {imported} -> ... -> {module} via {back}"


def test_no_package_file_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"split these files (over 400 lines): {long}"
