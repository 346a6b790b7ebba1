"""PyTorch for the tests that need it.

``from tests.torch_support import torch`` skips the importing test module in the pass that
blocks torch (``tests/no_torch``), and only there: anywhere else a missing torch is an error,
since the test command installs the torch extra.
"""

from __future__ import annotations

import os

import pytest

BLOCKED_ENV = "AUMAI_FEDTRAIN_BLOCK_TORCH"

if os.environ.get(BLOCKED_ENV) == "1":
    pytest.skip("torch is blocked in this pass (the core without torch)", allow_module_level=True)

import torch  # noqa: E402

__all__ = ["BLOCKED_ENV", "torch"]
