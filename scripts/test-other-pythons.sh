#!/usr/bin/env bash
# `make test-pythons`: the console-path tests (newest dependencies) on every other Python the
# README's "Supported versions" names (3.12, 3.13), each in its own .venv-pyX.Y. Debian bookworm
# packages only 3.11, so an interpreter is looked for on PATH and among pyenv's installed versions;
# one that is not on this machine is reported and left out (no registry here can provide it).
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # the first working python$1 on PATH or in pyenv's versions
  local v=$1 cand
  for cand in "$(command -v "python$v" 2>/dev/null || true)" \
              ${PYENV_ROOT:-$HOME/.pyenv}/versions/"$v".*/bin/"python$v"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c 'pass' 2>/dev/null; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

status=0
for v in 3.12 3.13; do
  if ! py=$(find_python "$v"); then
    echo "test-pythons: Python $v is not on this machine; left out"
    continue
  fi
  venv=".venv-py$v"
  if ! [ -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e '.[test]'
    touch "$venv/.installed"
  fi
  echo "test-pythons: $("$venv/bin/python" --version) ($py)"
  "$venv/bin/pytest" -q -p no:cacheprovider "$@" || status=1
done
exit $status
