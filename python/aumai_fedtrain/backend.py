"""Selection of the hot-path backend: the native Rust core or the pure-Python fallback.

The native extension is used when it imports and was built for the installed version of the
package; ``AUMAI_FEDTRAIN_BACKEND=python|native`` forces one (forcing ``native`` when the
extension is unusable is an error). A missing or stale extension is reported once, when the
package is imported, by a ``RuntimeWarning``. Classes that use a hot path take an optional
``backend`` argument with the same names.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any, Protocol, cast

import numpy as np

from aumai_fedtrain import _fallback

ENV_VAR = "AUMAI_FEDTRAIN_BACKEND"
BACKEND_NAMES = ("native", "python")
DISTRIBUTION = "aumai-fedtrain"
REBUILD_HINT = "reinstall with `pip install -e .` (from a source checkout) to rebuild it"


class RunningSum(Protocol):
    """A running weighted mean (``aumai_fedtrain._fallback.WeightedSum`` documents it)."""

    def fold(
        self,
        updates: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        labels: Sequence[str] | None = None,
    ) -> None: ...

    def fold_encoded(
        self,
        updates: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        labels: Sequence[str] | None = None,
    ) -> None: ...

    def finish(self) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    """The functions every backend provides (``aumai_fedtrain._fallback`` documents them)."""

    @property
    def WeightedSum(self) -> Callable[[], RunningSum]:
        """A new :class:`RunningSum` of this backend."""

    def canonical_hash(self, gradients: Mapping[str, Any]) -> str: ...

    def canonical_hashes(self, maps: Sequence[Mapping[str, Any]]) -> list[str]: ...

    def wire_digest(self, gradients: Mapping[str, Any]) -> str: ...

    def max_abs(self, maps: Sequence[Mapping[str, Any]]) -> list[list[float]]: ...

    def weighted_average(
        self,
        updates: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        labels: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]: ...

    def dequantise_average(
        self,
        codec: str,
        block_size: int,
        dtype: str,
        count: int,
        codes: Sequence[np.ndarray],
        scales: Sequence[np.ndarray | None],
        weights: Sequence[float],
    ) -> np.ndarray: ...


def _load_native() -> tuple[ModuleType | None, str | None]:
    """The native extension if it is usable, else None and what is wrong with it."""
    try:
        from aumai_fedtrain import _native
    except ImportError as exc:
        return None, f"the native extension aumai_fedtrain._native is not built ({exc})"
    try:
        installed = version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree that is not installed: nothing to compare
        return _native, None
    built = getattr(_native, "__version__", "unknown")
    if built != installed:
        return None, (
            f"the native extension aumai_fedtrain._native is stale (built for version {built}, "
            f"the installed package is version {installed})"
        )
    return _native, None


_native, _native_problem = _load_native()
if _native_problem is not None:
    warnings.warn(
        f"{_native_problem}; the slow pure-Python fallback is in use: {REBUILD_HINT}",
        RuntimeWarning,
        stacklevel=1,
    )


def native_available() -> bool:
    """Whether the compiled extension imported and matches the installed package."""
    return _native is not None


def get_backend(name: str | None = None) -> Backend:
    """Return the backend called ``name``, or the default one when ``name`` is None.

    The default is ``$AUMAI_FEDTRAIN_BACKEND`` when set, else native when available, else
    python.

    Raises
    ------
    ValueError
        An unknown backend name.
    RuntimeError
        ``native`` is requested but the extension is missing or stale.
    """
    chosen = name if name is not None else os.environ.get(ENV_VAR, "").strip().lower() or None
    if chosen is None:
        chosen = "native" if _native is not None else "python"
    if chosen == "python":
        return cast(Backend, _fallback)
    if chosen == "native":
        if _native is None:
            problem = _native_problem or "the native extension aumai_fedtrain._native is missing"
            raise RuntimeError(
                f"the native backend was requested but {problem}: {REBUILD_HINT}, "
                f"or use the python backend ({ENV_VAR}=python)"
            )
        return cast(Backend, _native)
    raise ValueError(f"unknown backend {chosen!r}: expected one of {', '.join(BACKEND_NAMES)}")
