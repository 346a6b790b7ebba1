"""Makes ``import torch`` fail in this interpreter and in its children: the core-without-torch pass.

``tests/run.sh`` runs the test suite once more with this folder first on ``PYTHONPATH``, so that
the core package is shown to import and pass its tests where PyTorch is not installed. The
environment variable it sets tells the tests that need PyTorch to skip (they skip there only).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

BLOCKED_ENV = "AUMAI_FEDTRAIN_BLOCK_TORCH"


class _NoTorch(MetaPathFinder):
    """Finds ``torch`` and its submodules as missing, whatever is installed."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname == "torch" or fullname.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
        return None


sys.meta_path.insert(0, _NoTorch())
os.environ[BLOCKED_ENV] = "1"
