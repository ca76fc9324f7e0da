#!/usr/bin/env bash
# One install path for everyone (README, tests, CI): creates .venv in the repo with the pinned stack,
# detectron2 from the sal-detectron2 wheel, and this project in editable mode.
# Idempotent: if nothing that defines the environment changed, it returns in about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAE_TRANSFER_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP="$VENV/.mae_transfer_env"
LOG="$VENV/setup.log"
D2_WHEEL_VERSION="0.7.2"

# Everything that defines the environment goes into the fingerprint; a changed pin means a reinstall.
fingerprint="$(cat "$ROOT/requirements/stack.txt" "$ROOT/requirements/lock.txt" "$ROOT/setup.cfg" \
                  "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$fingerprint" && -x "$VENV/bin/python" ]] \
   && "$VENV/bin/python" -c "import mae_transfer" >/dev/null 2>&1; then
  echo "[setup] environment up to date: $VENV"
  exit 0
fi

step="start"
fail() {
  echo "[setup] FAILED at step '$step'. Last lines of $LOG:" >&2
  tail -n 15 "$LOG" >&2 || true
  exit 1
}
trap fail ERR
run_step() {  # run_step NAME CMD...: logs the command's output, shows only the step name
  step="$1"; shift
  echo "[setup] $step"
  "$@" >>"$LOG" 2>&1
}

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "[setup] FAILED: need Python 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
}

mkdir -p "$VENV"
: >"$LOG"
[[ -x "$VENV/bin/python" ]] || run_step "create virtual environment $VENV" "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

run_step "install pinned stack (torch, mmseg, timm, ...)" \
  "${PIP[@]}" install -r "$ROOT/requirements/stack.txt" -c "$ROOT/requirements/lock.txt"

# detectron2: the sal-detectron2 wheel is tagged cp310 only, but its Python code runs on 3.11.
# Download it for 3.10, re-tag the file name as py3 and install it without letting pip touch
# numpy (it asks for numpy<2, which the stack already satisfies; its other needs are in lock.txt).
WHEELS="$VENV/wheels"
D2_PY3="$WHEELS/sal_detectron2-$D2_WHEEL_VERSION-py3-none-any.whl"
if [[ ! -f "$D2_PY3" ]]; then
  run_step "download sal-detectron2==$D2_WHEEL_VERSION wheel" \
    "${PIP[@]}" download --no-deps --python-version 3.10 --only-binary=:all: \
      "sal-detectron2==$D2_WHEEL_VERSION" -d "$WHEELS"
  step="re-tag detectron2 wheel as py3"
  cp "$WHEELS"/sal_detectron2-"$D2_WHEEL_VERSION"-cp310-*.whl "$D2_PY3.tmp"
  mv "$D2_PY3.tmp" "$D2_PY3"
fi
run_step "install detectron2 (sal-detectron2 wheel)" \
  "${PIP[@]}" install "$D2_PY3" -c "$ROOT/requirements/lock.txt"

run_step "install mae-transfer (editable)" \
  "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"

run_step "check imports" "$VENV/bin/python" -c "import mae_transfer, backbones, detectron2, mmseg"

echo "$fingerprint" >"$STAMP"
echo "[setup] done: $VENV"
