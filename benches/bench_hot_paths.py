"""Side-by-side benchmark of the native hot paths against their Python/NumPy contenders.

Runs every contender of a workload in the same repetition loop (interleaved), reports the
median of the repetitions, and prints a markdown table with the speed-ups:

- ``canonical_hash`` on 10^6 float64 values, given as an array and as a list, against
  ``hashlib.sha256(json.dumps(plain, sort_keys=True).encode())`` (with the ``.tolist()`` that
  ``plain`` does for arrays);
- ``weighted_average`` for N = 2, 10, 100 nodes x P = 10^4, 10^6 float64 arrays, against the
  faster of two NumPy streaming averages (``acc += c * a``, and ``np.multiply``/``np.add``
  into preallocated buffers).

Usage::

    python benches/bench_hot_paths.py            # the full run recorded in docs/performance.md
    python benches/bench_hot_paths.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from aumai_fedtrain.backend import get_backend

HASH_TARGET_ARRAY = 15.0
HASH_TARGET_LIST = 8.0
AVERAGE_TARGET = 1.5


@dataclass(frozen=True)
class Row:
    """One table row: a workload, its contender and the two median timings."""

    workload: str
    contender: str
    contender_s: float
    native_s: float
    target: float | None

    @property
    def speedup(self) -> float:
        return self.contender_s / self.native_s


def count(n: int) -> str:
    """``10^k`` for a power of ten, else the number."""
    digits = str(n)
    return f"10^{len(digits) - 1}" if digits.rstrip("0") == "1" else digits


def medians(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time (s) per call of each contender, timed in the same repetition loop.

    One warm-up call each sizes the loop: fast workloads run several calls per repetition
    (at least ~20 ms of the slowest contender). The garbage collector is off while timing, as
    with ``timeit``.
    """
    warmup = []
    for run in contenders.values():
        start = time.perf_counter()
        run()
        warmup.append(time.perf_counter() - start)
    number = max(1, min(1000, int(0.02 / max(warmup))))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, run in contenders.items():
                start = time.perf_counter()
                for _ in range(number):
                    run()
                times[name].append((time.perf_counter() - start) / number)
    finally:
        gc.enable()
    return {name: statistics.median(samples) for name, samples in times.items()}


def reference_hash(gradients: dict[str, Any]) -> str:
    """The contract's definition: ``.tolist()`` for arrays, then json.dumps and SHA-256."""
    plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in gradients.items()}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode("utf-8")).hexdigest()


def bench_hash(size: int, repeats: int) -> list[Row]:
    native = get_backend("native")
    values = np.random.default_rng(0).standard_normal(size)
    rows = []
    for form, data, target in [
        ("array", values, HASH_TARGET_ARRAY),
        ("list", values.tolist(), HASH_TARGET_LIST),
    ]:
        gradients = {"w": data}
        assert native.canonical_hash(gradients) == reference_hash(gradients)
        timings = medians(
            {
                "json": lambda g=gradients: reference_hash(g),
                "native": lambda g=gradients: native.canonical_hash(g),
            },
            repeats,
        )
        rows.append(
            Row(
                workload=f"canonical_hash, {count(size)} float64 as {form}",
                contender="json.dumps + hashlib" + (" (with .tolist())" if form == "array" else ""),
                contender_s=timings["json"],
                native_s=timings["native"],
                target=target if size == 10**6 else None,
            )
        )
    return rows


def numpy_scaled_add(arrays: list[np.ndarray], coefficients: list[float]) -> np.ndarray:
    """NumPy streaming average: ``acc += c * a`` (a temporary per node)."""
    acc = np.zeros_like(arrays[0])
    for array, c in zip(arrays, coefficients, strict=True):
        acc += c * array
    return acc


def numpy_preallocated(arrays: list[np.ndarray], coefficients: list[float]) -> np.ndarray:
    """NumPy streaming average into preallocated buffers: ``multiply`` then ``add``."""
    acc = np.zeros_like(arrays[0])
    tmp = np.empty_like(acc)
    for array, c in zip(arrays, coefficients, strict=True):
        np.multiply(array, c, out=tmp)
        np.add(acc, tmp, out=acc)
    return acc


def bench_average(nodes: int, size: int, repeats: int) -> Row:
    native = get_backend("native")
    rng = np.random.default_rng(nodes * 7 + size)
    arrays = [rng.standard_normal(size) for _ in range(nodes)]
    weights = rng.uniform(1.0, 100.0, nodes).tolist()
    total = sum(weights)
    coefficients = [w / total for w in weights]
    updates = [{"w": array} for array in arrays]
    # Both backends compute the specified sequence of roundings: the same bytes.
    expected = get_backend("python").weighted_average(updates, weights)["w"]
    assert native.weighted_average(updates, weights)["w"].tobytes() == expected.tobytes()
    timings = medians(
        {
            "acc += c * a": lambda: numpy_scaled_add(arrays, coefficients),
            "multiply/add into buffers": lambda: numpy_preallocated(arrays, coefficients),
            "native": lambda: native.weighted_average(updates, weights),
        },
        repeats,
    )
    native_s = timings.pop("native")
    best = min(timings, key=timings.__getitem__)
    return Row(
        workload=f"weighted_average, N={nodes} x P={count(size)} float64",
        contender=f"best NumPy: {best}",
        contender_s=timings[best],
        native_s=native_s,
        target=AVERAGE_TARGET if (nodes, size) == (100, 10**6) else None,
    )


def machine() -> str:
    """CPU model, core count, Python and NumPy versions."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return (
        f"{model}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"NumPy {np.__version__}; {platform.system()} {platform.machine()}"
    )


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unavailable"


def milliseconds(seconds: float) -> str:
    """Milliseconds with three significant decimals for short times."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.3f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| Workload | Contender | Contender (ms) | Native (ms) | Speed-up | Target |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        target = "-"
        if row.target is not None:
            verdict = "met" if row.speedup >= row.target else "NOT met"
            target = f">= {row.target:g}x: {verdict}"
        lines.append(
            f"| {row.workload} | {row.contender} | {milliseconds(row.contender_s)} | "
            f"{milliseconds(row.native_s)} | {row.speedup:.1f}x | {target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per contender")
    args = parser.parse_args(argv)

    if args.quick:
        hash_size, sizes, node_counts, repeats = 10**4, [10**3], [2, 3], 2
    else:
        hash_size, sizes, node_counts, repeats = 10**6, [10**4, 10**6], [2, 10, 100], 7
    repeats = args.repeats or repeats

    command = shlex.join(["python", *sys.argv])
    print(f"Machine: {machine()}")
    print(f"Command: `{command}` (median of {repeats} interleaved repetitions)")
    print(f"Load average before: {load_average()}")
    rows = bench_hash(hash_size, repeats)
    rows += [bench_average(n, p, repeats) for p in sizes for n in node_counts]
    print(f"Load average after: {load_average()}")
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
