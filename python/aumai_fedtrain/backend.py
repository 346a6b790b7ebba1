"""Selection of the hot-path backend: the native Rust core or the pure-Python fallback.

The native extension is used when it imports; ``AUMAI_FEDTRAIN_BACKEND=python|native``
forces one (forcing ``native`` when the extension is missing is an error). Classes that use a
hot path take an optional ``backend`` argument with the same names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import numpy as np

from aumai_fedtrain import _fallback

try:
    from aumai_fedtrain import _native
except ImportError:  # pragma: no cover - exercised only on installs without the extension
    _native = None

ENV_VAR = "AUMAI_FEDTRAIN_BACKEND"
BACKEND_NAMES = ("native", "python")


class Backend(Protocol):
    """The two functions every backend provides."""

    def canonical_hash(self, gradients: Mapping[str, Any]) -> str: ...

    def weighted_average(
        self,
        updates: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        labels: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]: ...


def native_available() -> bool:
    """Whether the compiled extension imported."""
    return _native is not None


def get_backend(name: str | None = None) -> Backend:
    """Return the backend called ``name``, or the default one when ``name`` is None.

    The default is ``$AUMAI_FEDTRAIN_BACKEND`` when set, else native when available, else
    python.
    """
    chosen = name if name is not None else os.environ.get(ENV_VAR, "").strip().lower() or None
    if chosen is None:
        chosen = "native" if _native is not None else "python"
    if chosen == "python":
        return cast(Backend, _fallback)
    if chosen == "native":
        if _native is None:
            raise RuntimeError(
                "the native backend was requested but aumai_fedtrain._native is not built; "
                "reinstall the package or use the python backend"
            )
        return cast(Backend, _native)
    raise ValueError(f"unknown backend {chosen!r}: expected one of {', '.join(BACKEND_NAMES)}")
