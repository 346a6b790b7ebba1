"""Shared fixtures: every backend-dependent test runs on both hot-path backends.

The test modules that need PyTorch are named ``test_torch_*.py``; in the pass that blocks torch
(``tests/no_torch``, which sets ``AUMAI_FEDTRAIN_BLOCK_TORCH=1``) they are skipped, and only
there: anywhere else a missing torch fails them, since the test command installs the extra.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from aumai_fedtrain.backend import BACKEND_NAMES, native_available

TORCH_BLOCKED = os.environ.get("AUMAI_FEDTRAIN_BLOCK_TORCH") == "1"


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request: pytest.FixtureRequest) -> str:
    """``"native"`` and ``"python"`` in turn (native skipped only when it is not built)."""
    if request.param == "native" and not native_available():
        pytest.skip("the native extension is not built")
    return str(request.param)


class _NeedsTorch(pytest.Module):
    """A ``test_torch_*`` module in the pass without torch: skipped, never imported."""

    def collect(self) -> Iterable[Any]:
        pytest.skip("needs torch, which this pass blocks (the core without torch)")


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> Any:
    if TORCH_BLOCKED and module_path.name.startswith("test_torch_"):
        return _NeedsTorch.from_parent(parent, path=module_path)
    return None
