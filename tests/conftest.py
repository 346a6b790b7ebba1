"""Shared fixtures: every backend-dependent test runs on both hot-path backends."""

from __future__ import annotations

import pytest

from aumai_fedtrain.backend import BACKEND_NAMES, native_available


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request: pytest.FixtureRequest) -> str:
    """``"native"`` and ``"python"`` in turn (native skipped only when it is not built)."""
    if request.param == "native" and not native_available():
        pytest.skip("the native extension is not built")
    return str(request.param)
