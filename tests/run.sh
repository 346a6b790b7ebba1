#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need into a virtualenv
# (every extra the tests use, ray included, and Debian's chromium for the report's screenshot
# test), builds the Rust extension, checks formatting, lints and types, runs cargo test and pytest (including
# tests/test_wheel.py, which builds the release wheel and installs it into a fresh
# virtualenv from PyPI), then pytest once more where `import torch` fails (the torch extra's
# tests skip there only; the wheel test, which installs no torch, is not repeated).
#   bash tests/run.sh            (set AUMAI_FEDTRAIN_VENV to use another virtualenv path)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${AUMAI_FEDTRAIN_VENV:-.venv}"
step() { printf '\n==> %s\n' "$*"; }

step "virtualenv ($venv) and dependencies"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
step "pip install -e .[dev,http,observability,torch,ray] (builds the native extension with maturin)"
python -m pip install --quiet -e ".[dev,http,observability,torch,ray]"

step "chromium (Debian's package) for the report's screenshot test"
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
python -c "import aumai_fedtrain.backend as b; assert b.native_available(), 'native extension missing'"

step "Rust: fmt, clippy, tests"
cargo fmt --check
cargo clippy --quiet --all-targets -- -D warnings
cargo clippy --quiet --all-targets --features python -- -D warnings
cargo test --quiet

step "Python: ruff, mypy, pytest"
ruff check .
ruff format --check .
mypy
python -m pytest -q

step "Python: the core tests once more where import torch fails (tests/no_torch)"
PYTHONPATH="$PWD/tests/no_torch" python -m pytest -q -p no:cacheprovider --ignore=tests/test_wheel.py
