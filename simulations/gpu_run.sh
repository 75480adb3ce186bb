#!/usr/bin/env bash
# The one command on the GPU machine, run from the repository root with .gpu-bundle/ carried (docs/gpu.md):
#   bash simulations/gpu_run.sh            # JSON and log into $OUT (the device tool's folder), else ./gpu-out
# Installs the carried wheels into /tmp/site (no index, no deps), unpacks MiniLM, runs simulations.gpu_check.
# Extra arguments go to the check (e.g. --skip federation). Exit status: the check's.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu-bundle
DEST=${OUT:-$PWD/gpu-out}
mkdir -p "$DEST"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$BUNDLE"/wheels/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export FLWR_HOME=/tmp/flwr-home FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
mkdir -p /tmp/minilm && cp "$BUNDLE"/minilm/*.json "$BUNDLE"/minilm/*.txt /tmp/minilm/
if [ -f "$BUNDLE/minilm/model.safetensors.xz" ]; then
    python3 -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.decompress(open(sys.argv[1], 'rb').read()))" \
        "$BUNDLE/minilm/model.safetensors.xz" /tmp/minilm/model.safetensors || exit 4
fi
echo "gpu_run: set up in $(($(date +%s) - t0)) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m simulations.gpu_check --out "$DEST/gpu_check.json" --minilm /tmp/minilm --work-dir /tmp/gpu_check \
    --part-timeout 150 --deadline ${GPU_CHECK_DEADLINE:-260} "$@" 2>&1 | tee "$DEST/gpu_check.log"
status=${PIPESTATUS[0]}
echo "gpu_run: exit $status after $(($(date +%s) - t0)) s"
exit "$status"
