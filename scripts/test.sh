#!/usr/bin/env bash
# Everything CI checks, from a fresh machine: set-up, lint, type check, the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The dashboard test drives a real browser: Debian's chromium (installed here when missing).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
. .venv/bin/activate
# One command per line: under `set -e` a failure inside an `a && b` list would not stop the script.
echo "== ruff"
ruff check server clients tests benchmarks
ruff format --check server clients tests benchmarks
echo "== mypy"
mypy
echo "== pytest"
python -m pytest -q -ra --durations=15 "$@"
