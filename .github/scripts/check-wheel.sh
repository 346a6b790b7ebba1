#!/usr/bin/env bash
# Release check of a freshly built wheel (dist/*.whl): installs it into a new virtualenv
# (dependencies from PyPI) and runs the CLI and the native backend from outside the checkout.
# tests/test_wheel.py makes the same checks in the test suite.
set -euo pipefail
wheel=$(ls dist/*.whl)
case "$wheel" in
  *-cp311-abi3-*) ;;
  *) echo "not an abi3 wheel for CPython >= 3.11: $wheel" >&2; exit 1 ;;
esac
work=$(mktemp -d)
trap 'cd / && rm -rf "$work"' EXIT
python -m venv "$work/venv"
if [ -d "$work/venv/Scripts" ]; then bin="$work/venv/Scripts"; else bin="$work/venv/bin"; fi
"$bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
cd "$work"
"$bin/aumai-fedtrain" --version
"$bin/aumai-fedtrain" run --rounds 1 --json > run.json
"$bin/python" -c "import json; r = json.load(open('run.json')); assert r['rounds_completed'] == 1, r"
"$bin/python" -c "import aumai_fedtrain.backend as b; assert b.native_available(), 'no native backend'"
