#!/usr/bin/env bash
# For each supported Python found on this machine: a fresh venv made by scripts/setup_env.sh, then the smoke
# subset (`pytest -m smoke`, tests/test_smoke.py) in it; one summary table at the end.
#   bash scripts/test_pythons.sh [--reuse] [VERSION ...]     (default: 3.10 3.11 3.12 3.13)
# --reuse: keep a venv that is already there (setup_env.sh brings it up to date in a second) instead of
#          making it anew; CI uses it for its 3.12 venv.
# Venvs: $MAE_TRANSFER_VENVS/.venv-pyX.Y (default: the repository root; .venv-py*/ is git-ignored); the setup
# and pytest output of each version is shown and kept in <venv>.log. A Python is looked up as python3.X on the PATH, then
# under pyenv ($PYENV_ROOT/versions/3.X.*). Exit status: 0 if every version found passed, 1 otherwise
# (2: bad arguments); a requested version that is not found fails too.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS="${MAE_TRANSFER_VENVS:-$ROOT}"
read -r -a SUPPORTED <<<"$(sed -n 's/^SUPPORTED=(\(.*\))$/\1/p' "$ROOT/scripts/setup_env.sh")"  # one list

reuse=0
versions=()
for arg in "$@"; do
  case "$arg" in
    --reuse) reuse=1 ;;
    *) if [[ " ${SUPPORTED[*]} " == *" $arg "* ]]; then versions+=("$arg"); continue; fi
       echo "usage: bash scripts/test_pythons.sh [--reuse] [VERSION ...]  (supported: ${SUPPORTED[*]})" >&2
       exit 2 ;;
  esac
done
explicit=$(( ${#versions[@]} > 0 ))
(( explicit )) || versions=("${SUPPORTED[@]}")

find_python() {  # find_python 3.X: prints an interpreter of that version, or fails
  local want="$1" candidate
  for candidate in "python$want" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want".*/bin/python; do
    [[ "$candidate" == */* && ! -x "$candidate" ]] && continue
    if [[ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" == "$want" ]]; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

rows=()
failed=0
for v in "${versions[@]}"; do
  py="$(find_python "$v")" || {
    if (( explicit )); then
      rows+=("$v|not found|-|-|-|FAILED: no python$v on the PATH or under pyenv"); failed=1
    else
      rows+=("$v|not found|-|-|-|skipped")
    fi
    continue
  }
  venv="$VENVS/.venv-py$v"
  log="$venv.log"
  echo "[pythons] Python $v: $py -> $venv (log: $log)"
  if (( ! reuse )) && [[ -e "$venv" ]]; then
    if [[ -f "$venv/pyvenv.cfg" ]]; then rm -rf "$venv"; else
      echo "[pythons] $venv exists and is not a venv: not removing it" >&2; failed=1; continue; fi
  fi
  start=$(date +%s)
  if ! MAE_TRANSFER_VENV="$venv" PYTHON="$py" bash "$ROOT/scripts/setup_env.sh" 2>&1 | tee "$log"; then
    rows+=("$v|$py|$(( $(date +%s) - start )) s|-|-|FAILED: setup (see $log)"); failed=1
    continue
  fi
  setup_s=$(( $(date +%s) - start ))
  size="$(du -sh "$venv" 2>/dev/null | cut -f1)"  # the torch wheel brings its CUDA libraries: most of it
  start=$(date +%s)
  # run_tests.sh: the README's command (its setup step is a no-op now); the smoke marker selects the subset.
  MAE_TRANSFER_VENV="$venv" PYTHON="$py" bash "$ROOT/scripts/run_tests.sh" -m smoke -q -p no:cacheprovider 2>&1 \
    | tee -a "$log"
  status=${PIPESTATUS[0]}
  test_s=$(( $(date +%s) - start ))
  summary="$(grep -E '([0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran).* in [0-9.]+s' "$log" \
             | tail -n 1 | tr -d '=' | xargs)"
  if [[ $status -eq 0 ]]; then
    rows+=("$v|$py|$setup_s s|$size|$test_s s|${summary:-passed}")
  else
    rows+=("$v|$py|$setup_s s|$size|$test_s s|FAILED (exit $status): ${summary:-see $log}"); failed=1
  fi
  echo "[pythons] Python $v: ${summary:-exit $status} in $test_s s"
done

echo
echo "[pythons] smoke subset per Python ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)," \
     "$(nproc) cores; setup = scripts/setup_env.sh, $([[ $reuse -eq 1 ]] && echo "venvs reused" || echo "fresh venvs"))"
printf '%-7s %-42s %-8s %-6s %-7s %s\n' version python setup venv tests result
for row in "${rows[@]}"; do
  IFS='|' read -r v py setup size test_s result <<<"$row"
  printf '%-7s %-42s %-8s %-6s %-7s %s\n' "$v" "$py" "$setup" "$size" "$test_s" "$result"
done
exit $failed
