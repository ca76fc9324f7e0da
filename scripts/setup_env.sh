#!/usr/bin/env bash
# One install path for everyone (README, tests, CI): creates .venv in the repo with the pinned stack,
# detectron2 from the sal-detectron2 wheel, and this project in editable mode.
# Python: $PYTHON if set; else the Python of an existing venv; else python3.11, then the newest other
# supported one found (python3.13, python3.12, python3.10, python3). The pins of each version:
# requirements/lock-pyX.Y.txt where it exists, else requirements/lock.txt (docs/ENVIRONMENT_NOTES.md has the matrix).
# Idempotent: if nothing that defines the environment changed, it returns in about a second.
# -E: the ERR trap below also fires for a step that fails inside run_step (a function).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAE_TRANSFER_VENV:-$ROOT/.venv}"
SUPPORTED=(3.10 3.11 3.12 3.13)
STAMP="$VENV/.mae_transfer_env"
LOG="$VENV/setup.log"
D2_WHEEL_VERSION="0.7.2"

version_of() {  # version_of PYTHON: prints X.Y, fails if it does not run
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}
full_version_of() { "$1" -c 'import sys; print(sys.version.split()[0])'; }
is_supported() {
  local v
  for v in "${SUPPORTED[@]}"; do [[ "$1" == "$v" ]] && return 0; done
  return 1
}
supported_list() { local IFS=,; echo "${SUPPORTED[*]}" | sed 's/,/, /g'; }

venv_version=""
[[ -x "$VENV/bin/python" ]] && venv_version="$(version_of "$VENV/bin/python")" || true
if [[ -n "${PYTHON:-}" ]]; then
  pyver="$(version_of "$PYTHON")" || {
    echo "[setup] FAILED: PYTHON=$PYTHON does not run; set PYTHON to a Python $(supported_list)" >&2; exit 1; }
elif [[ -n "$venv_version" ]] && is_supported "$venv_version"; then
  PYTHON="$VENV/bin/python"; pyver="$venv_version"   # keep the venv's Python: no surprise rebuild
else
  pyver=""
  # python3.11 first (the reference, CI's), then the newest other supported version on the PATH.
  for candidate in python3.11 python3.13 python3.12 python3.10 python3; do
    v="$(version_of "$candidate")" || continue
    if is_supported "$v"; then PYTHON="$candidate"; pyver="$v"; break; fi
  done
  [[ -n "$pyver" ]] || {
    echo "[setup] FAILED: no supported Python found (python3.11, python3.13, python3.12, python3.10, python3);" \
         "supported: $(supported_list); set PYTHON=/path/to/python3.X" >&2; exit 1; }
fi
is_supported "$pyver" || {
  echo "[setup] FAILED: Python $pyver ($PYTHON) is not supported; supported: $(supported_list)" \
       "(set PYTHON=/path/to/python3.X)" >&2; exit 1; }

LOCK="$ROOT/requirements/lock-py$pyver.txt"
[[ -f "$LOCK" ]] || LOCK="$ROOT/requirements/lock.txt"
full_version="$(full_version_of "$PYTHON")"

# Everything that defines the environment goes into the fingerprint; a changed pin means a reinstall.
fingerprint="$( (echo "$pyver"; cat "$ROOT/requirements/stack.txt" "$LOCK" "$ROOT/setup.cfg" \
                  "$ROOT/scripts/setup_env.sh") | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$fingerprint" && "$venv_version" == "$pyver" ]] \
   && "$VENV/bin/python" -c "import mae_transfer" >/dev/null 2>&1; then
  echo "[setup] environment up to date: $VENV (Python $(full_version_of "$VENV/bin/python"))"
  exit 0
fi
echo "[setup] using Python $full_version ($PYTHON), pins: ${LOCK#"$ROOT/"}"

step="start"
free_space() { df -Ph "$VENV" 2>/dev/null | awk 'NR == 2 {print $4}'; }
fail() {
  echo "[setup] FAILED at step '$step' ($(free_space) free on the venv's disk). Last lines of $LOG:" >&2
  tail -n 15 "$LOG" >&2 || true
  if grep -q "No space left on device" "$LOG" 2>/dev/null; then
    echo "[setup] the disk is full: a venv takes about 6 GB (torch's CUDA libraries); free some and run it again" >&2
  fi
  exit 1
}
trap fail ERR
run_step() {  # run_step NAME CMD...: logs the command's output, shows only the step name
  step="$1"; shift
  echo "[setup] $step"
  "$@" >>"$LOG" 2>&1
}

if [[ -n "$venv_version" && "$venv_version" != "$pyver" ]]; then
  # A venv is bound to one interpreter: packages of another Python version cannot be reused.
  echo "[setup] $VENV has Python $venv_version, not $pyver: recreating it"
  "$PYTHON" -m venv --clear "$VENV"
fi
mkdir -p "$VENV"
: >"$LOG"
avail_kb="$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')"
if [[ ! -d "$VENV/lib/python$pyver/site-packages/torch" && "${avail_kb:-0}" -lt $(( 8 * 1024 * 1024 )) ]]; then
  echo "[setup] warning: only $(free_space) free on the venv's disk; a new venv takes about 6 GB"
fi
[[ -x "$VENV/bin/python" ]] || run_step "create virtual environment $VENV" "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

run_step "install pinned stack (torch, mmseg, timm, ...)" \
  "${PIP[@]}" install -r "$ROOT/requirements/stack.txt" -c "$LOCK"

# detectron2 from the sal-detectron2 wheel, which is tagged cp310 only (its compiled detectron2._C too).
if [[ "$pyver" == "3.10" ]]; then
  # Its own Python: the wheel as it is; whether its _C loads with our torch is checked below.
  run_step "install detectron2 (sal-detectron2 wheel)" \
    "${PIP[@]}" install "sal-detectron2==$D2_WHEEL_VERSION" -c "$LOCK"
else
  # Other versions run its Python code: download it for 3.10 and re-tag the file name as py3.
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
  if "$VENV/bin/python" -c 'import numpy, sys; sys.exit(int(numpy.__version__.split(".")[0]) < 2)'; then
    # The wheel asks for numpy<2, but no numpy 1.x wheel exists for this Python (3.13): install it without
    # its requirements, then its other requirements (all in the lock) at their locked versions.
    run_step "install detectron2 (sal-detectron2 wheel, its numpy<2 not enforced)" \
      "${PIP[@]}" install --no-deps "$D2_PY3"
    run_step "install detectron2's requirements from ${LOCK#"$ROOT/"}" "${PIP[@]}" install -r "$LOCK"
  else
    run_step "install detectron2 (sal-detectron2 wheel)" \
      "${PIP[@]}" install "$D2_PY3" -c "$LOCK"
  fi
fi

run_step "install mae-transfer (editable)" \
  "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"

run_step "check imports" "$VENV/bin/python" -c "import mae_transfer, backbones, detectron2, mmseg"
d2_ops="$("$VENV/bin/python" -c 'from mae_transfer.detection.compiled_ops import detectron2_compiled_ops_status as s; print(s())')"
echo "[setup] detectron2 compiled ops (detectron2._C): $d2_ops"

echo "$fingerprint" >"$STAMP"
echo "[setup] done: $VENV (Python $full_version)"
