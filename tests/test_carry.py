"""What travels to a GPU machine fits: the tracked tree and the GPU bundle leave at least 4 MiB of the 64 MiB.

The device tool carries the working tree and `.gpu-bundle/` (simulations/gpu_bundle.sh, docs/gpu.md) within
64 MiB together. Where the bundle was built, the script's own measurement (`.gpu-bundle/SIZE`) counts; elsewhere
(CI) its last measured size below stands in, and the larger of the two is used so that a bundle built without
MiniLM cannot hide a grown tree. The 4 MiB of room is for what else travels (untracked files, `shared/`) and for
the tree's growth between two runs of this test.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * 2**20  # the device tool's limit on what travels with a command
SPARE = 4 * 2**20
# `bash simulations/gpu_bundle.sh` on 2026-12-06: 32 wheels re-zipped with LZMA (18,315,440 B) and MiniLM's fp16
# weights xz-packed for 16-bit data with its tokenizer (39,673,032 B). Update it when the pins of the carried
# packages change (the script prints bundle_bytes).
BUNDLE_BYTES = 57_992_717


def tracked_tree_bytes() -> tuple[int, list[tuple[int, str]]]:
    """The bytes of every tracked file present in the checkout (a link counts as itself), and the largest ten."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    sizes = []
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if name and (path.is_symlink() or path.exists()):
            sizes.append((path.lstat().st_size, name))
    return sum(s for s, _ in sizes), sorted(sizes, reverse=True)[:10]


def bundle_bytes() -> int:
    """The larger of the recorded bundle size and the one gpu_bundle.sh measured here, if it ran."""
    size = ROOT / ".gpu-bundle" / "SIZE"
    found = re.search(r"^bundle_bytes=(\d+)", size.read_text(), re.M) if size.is_file() else None
    return max(BUNDLE_BYTES, int(found.group(1)) if found else 0)


def test_the_tree_and_the_gpu_bundle_leave_room_in_what_may_travel() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked tree to measure")
    tree, largest = tracked_tree_bytes()
    bundle = bundle_bytes()
    spare = LIMIT - tree - bundle
    listing = "\n".join(f"  {s:>9,} B  {n}" for s, n in largest)
    assert spare >= SPARE, (
        f"the tracked tree ({tree:,} B) and the GPU bundle ({bundle:,} B) leave {spare:,} B of the 64 MiB "
        f"that travel to a GPU machine, under the {SPARE:,} B wanted. Keep run artefacts out of git or packed "
        f"(a finished sweep's cells as one .tar.xz, plots as 256-colour PNGs; docs/gpu.md). Largest files:\n"
        f"{listing}"
    )
