#!/usr/bin/env bash
# Make the GPU kit here (where pip reaches the registry): every package of requirements/gpu_kit.txt as a wheel
# that the GPU machine's Python 3.12 (x86_64 Linux) installs offline, in .whl/ (git-ignored), then check it
# against what that machine's image has (requirements/gpu_image.txt) and print the list and total size.
# Never fetches torch, torchvision, numpy or anything else the image has (--no-deps: only the pins).
#   bash scripts/gpu_kit.sh [KIT_DIR]        (default .whl; PYTHON=python3 runs pip and the check)
# Idempotent: a wheel already there is kept. docs/GPU.md says how the kit travels and is used.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$(mkdir -p "${1:-$ROOT/.whl}" && cd "${1:-$ROOT/.whl}" && pwd)"
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip --disable-pip-version-check -q)
# pip matches manylinux_2_N exactly: name every N that wheels of these packages use.
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}")
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

have() {  # have NAME VERSION: a wheel of it is already in the kit
  local stem="${1//-/_}"
  compgen -G "$KIT/${stem}-$2-*.whl" >/dev/null || compgen -G "$KIT/$1-$2-*.whl" >/dev/null
}

fetch() {  # fetch NAME VERSION: into $KIT
  local name="$1" version="$2" got
  rm -rf "$TMP/one" && mkdir -p "$TMP/one"
  if [[ "$name" == "sal-detectron2" ]]; then
    # Tagged cp310 only; its Python code runs on 3.12, its compiled _C does not load (torchvision's ops serve
    # Mask R-CNN): re-named py3-none-any, as scripts/setup_env.sh does.
    "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.10 "$name==$version" -d "$TMP/one"
    got="$(ls "$TMP"/one/*.whl)"
    mv "$got" "$KIT/sal_detectron2-$version-py3-none-any.whl"
  elif "${PIP[@]}" download --no-deps "${TARGET[@]}" "$name==$version" -d "$TMP/one" 2>"$TMP/err"; then
    mv "$TMP"/one/*.whl "$KIT/"
  else
    # No wheel for 3.12 x86_64: a source-only package; build its wheel here and keep it only if pure Python.
    "${PIP[@]}" wheel --no-deps --no-binary=:all: "$name==$version" -w "$TMP/one" >/dev/null 2>>"$TMP/err" || {
      echo "error: $name==$version: no cp312 / pure wheel and no buildable source:" >&2; cat "$TMP/err" >&2; exit 1; }
    got="$(ls "$TMP"/one/*.whl)"
    [[ "$got" == *-none-any.whl ]] || { echo "error: $name==$version built a platform wheel $got" >&2; exit 1; }
    mv "$got" "$KIT/"
  fi
}

echo "[gpu_kit] $KIT: wheels of requirements/gpu_kit.txt for CPython 3.12, x86_64 Linux"
while read -r pin; do
  name="${pin%%==*}"; version="${pin#*==}"
  have "$name" "$version" || fetch "$name" "$version"
done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$ROOT/requirements/gpu_kit.txt" | grep .)

# Fallback wheels, installed there only where the image lacks what they provide (harnesses/gpu_kit.py).
mkdir -p "$KIT/fallback"
for pin in $(cd "$ROOT" && "$PY" -c "from harnesses.gpu_kit import IF_MISSING; print(' '.join(IF_MISSING))"); do
  name="${pin%%==*}"; version="${pin#*==}"
  compgen -G "$KIT/fallback/${name//-/_}-$version-*.whl" >/dev/null || \
    "${PIP[@]}" download --no-deps "${TARGET[@]}" "$pin" -d "$KIT/fallback"
done

cd "$ROOT"
"$PY" -m harnesses.gpu_kit check "$KIT"
echo "[gpu_kit] the repo as it travels (tracked files): $(git -C "$ROOT" archive HEAD | wc -c | awk '{printf "%.2f", $1 / 2^20}') MiB;" \
  "limit of a device call: 64 MiB (kit + repo)"
