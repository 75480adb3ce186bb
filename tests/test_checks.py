"""The one validator and the one seed derivation (fl.checks), and that no other copy is left in the packages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fl.checks import derive_seed, require

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fl", "strategies", "clients", "privacy", "simulations")


def test_require_names_the_key_the_value_and_the_fix() -> None:
    require(True, "server_opt.lr", -1.0, "never raised")
    with pytest.raises(ValueError, match=r"^server_opt\.lr=-1\.0 is invalid: use a rate > 0\.$"):
        require(False, "server_opt.lr", -1.0, "use a rate > 0.")
    with pytest.raises(ValueError, match=r"^privacy\.delta must be in \(0, 1\), got 1\.5\. Use 1e-5\.$"):
        require(False, "privacy.delta", 1.5, "Use 1e-5.", must="in (0, 1)")


def test_derive_seed_keeps_the_formulas_it_replaced() -> None:
    # the four hand-written formulas it replaced, so seeded draws (and the golden metrics) did not move
    assert derive_seed(7, server_round=3, index=2) == (7 * 1_000_003 + 3 * 10_007 + 2) % (2**31 - 1)
    assert derive_seed(7, server_round=3, index=4 * 101) == (7 * 1_000_003 + 3 * 10_007 + 404) % (2**31 - 1)
    assert derive_seed(7, stream=7_919, index=5, modulus=2**63) == 7 * 1_000_003 + 7_919 + 5
    assert derive_seed(2**40, stream=123, modulus=2**63) == (2**40 * 1_000_003 + 123) % 2**63
    seeds = {derive_seed(0, server_round=r, index=i) for r in range(1, 20) for i in range(50)}
    assert len(seeds) == 19 * 50  # distinct streams per (round, party)


def test_no_second_validator_or_seed_formula_in_the_packages() -> None:
    copies = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            if path.name != "checks.py" and re.search(r"^def _?require\(", text, re.M):
                copies.append(f"{path.relative_to(ROOT)}: a require of its own")
            if path.name != "checks.py" and "1_000_003" in text:
                copies.append(f"{path.relative_to(ROOT)}: the seed formula written out")
    assert not copies, copies
