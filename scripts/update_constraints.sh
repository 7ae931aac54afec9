#!/usr/bin/env bash
# Move constraints.txt forward: install the newest releases within pyproject.toml's bounds into a fresh virtual
# environment, run the test suite there, and only if it passes rewrite constraints.txt with the exact versions.
# Usage (from the project root, with ../shared beside it): bash scripts/update_constraints.sh
# Raise an upper bound in pyproject.toml first to try a newer major release; commit both files together.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d /tmp/opentrans-constraints.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet --upgrade -e ".[dev]"
"$venv/bin/python" -m pytest -q
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)
isa=$(grep -m1 "^flags" /proc/cpuinfo | tr ' ' '\n' | grep -xE "avx2|fma|avx512f|avx512_vnni|avx_vnni|avx512_bf16|amx_int8" | paste -sd, - || true)
tmp=$(mktemp constraints.txt.XXXXXX)
{
  echo "# Exact versions the test suite last passed with (CPU: $cpu, $isa; Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'); $(date +%F))."
  echo "# Used by both README commands and .ci/run: pip install -c constraints.txt -e \".[dev]\"."
  echo "# Move it forward with scripts/update_constraints.sh (newest versions within pyproject's bounds, suite, rewrite)."
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v "^opentrans" | sort -f
} > "$tmp"
mv "$tmp" constraints.txt
echo "constraints.txt updated; review 'git diff constraints.txt' and commit it with any bound you raised."
