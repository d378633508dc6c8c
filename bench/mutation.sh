#!/usr/bin/env bash
# Mutation testing of the modules where a bug costs data or trust; see bench/mutation.py.
#   bench/mutation.sh [MODULE ...]      e.g. bench/mutation.sh mirrord/redact.py
# Needs the `mutation` extra (pip install -e ".[test,mutation]"). Runs at the lowest priority: it is long.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
exec nice -n 19 "$python" bench/mutation.py "$@"
