"""Backend selection, and the warning when the native extension is missing or stale."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from aumai_fedtrain import _fallback, backend
from aumai_fedtrain.backend import ENV_VAR, get_backend, native_available

needs_native = pytest.mark.skipif(
    not native_available(), reason="the native extension is not built"
)

# Imports the package with `_native` replaced (SETUP), records every warning, and prints what
# the package then uses.
PROBE = """
import sys, types, warnings
{setup}
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import aumai_fedtrain
    import aumai_fedtrain.backend as backend
    import importlib
    importlib.import_module("aumai_fedtrain.backend")
    from aumai_fedtrain import HashVerifier
    HashVerifier().compute_hash({{"w": [1.0]}})
    backend.get_backend()
runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
print(len(runtime))
for w in runtime:
    print(w.message)
print("default:", backend.get_backend().__name__)
try:
    backend.get_backend("native")
except RuntimeError as exc:
    print("native:", exc)
"""


def probe(setup: str) -> list[str]:
    """Run :data:`PROBE` in a fresh interpreter; its output lines."""
    code = PROBE.format(setup=textwrap.dedent(setup))
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_extension_exports_the_crate_version() -> None:
    native = pytest.importorskip("aumai_fedtrain._native")
    cargo = tomllib.loads((Path(__file__).parents[1] / "Cargo.toml").read_text("utf-8"))

    assert native.__version__ == cargo["package"]["version"]
    assert native.__version__ == version("aumai-fedtrain")


@pytest.mark.parametrize("name", ["python", "native"])
def test_the_environment_variable_picks_the_backend(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    if name == "native" and not native_available():
        pytest.skip("the native extension is not built")
    monkeypatch.setenv(ENV_VAR, f" {name.upper()} ")

    chosen = get_backend()

    assert chosen is (backend._native if name == "native" else _fallback)


def test_without_the_environment_variable_native_is_preferred(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)

    chosen = get_backend()

    assert chosen is (backend._native if native_available() else _fallback)


@pytest.mark.parametrize("name", ["rust", "numpy", "nativ"])
def test_an_unknown_backend_name_is_a_value_error(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(ENV_VAR, name)

    with pytest.raises(
        ValueError, match=rf"unknown backend '{name}': expected one of native, python"
    ):
        get_backend()
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend(name)


def test_forcing_native_without_the_extension_is_a_runtime_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backend, "_native", None)
    monkeypatch.setenv(ENV_VAR, "native")

    with pytest.raises(RuntimeError, match="native backend was requested") as error:
        get_backend()
    assert "pip install -e ." in str(error.value)
    assert get_backend("python") is _fallback
    monkeypatch.delenv(ENV_VAR)
    assert get_backend() is _fallback


def test_a_missing_extension_warns_once_and_falls_back() -> None:
    lines = probe('sys.modules["aumai_fedtrain._native"] = None  # the import fails')

    assert lines[0] == "1", lines
    assert "not built" in lines[1]
    assert "pure-Python fallback" in lines[1]
    assert "pip install -e ." in lines[1]
    assert lines[2] == "default: aumai_fedtrain._fallback"
    assert lines[3].startswith("native: the native backend was requested but")
    assert "not built" in lines[3]


def test_a_stale_extension_warns_once_and_is_not_used() -> None:
    lines = probe(
        """
        stale = types.ModuleType("aumai_fedtrain._native")
        stale.__version__ = "0.0.1"
        def fail(*args, **kwargs):
            raise AssertionError("the stale extension was used")
        stale.canonical_hash = stale.weighted_average = fail
        sys.modules["aumai_fedtrain._native"] = stale
        """
    )

    assert lines[0] == "1", lines
    assert "stale (built for version 0.0.1" in lines[1]
    assert "pure-Python fallback" in lines[1]
    assert "pip install -e ." in lines[1]
    assert lines[2] == "default: aumai_fedtrain._fallback"
    assert "stale" in lines[3]


@needs_native
def test_a_current_extension_is_used_without_a_warning() -> None:
    lines = probe("")

    assert lines == ["0", "default: aumai_fedtrain._native"]
