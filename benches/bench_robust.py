"""Robust aggregation: the native kernels against NumPy, side by side in one run.

For each ``N`` (updates) x ``P`` (float64 values per update):

- median: ``aumai_fedtrain.robust.median`` on the native backend against NumPy's best of
  ``np.median(stack, axis=0)`` and an ``np.partition`` median over the stacked ``(N, P)``
  array (stacking not timed);
- trimmed mean (trim fraction 0.1, at least one value per side): ``robust.trimmed_mean``
  against ``np.partition(stack, (k, N - k - 1), axis=0)[k:N - k].mean(axis=0)``;
- with Flower installed (``pip install 'aumai-fedtrain[bench]'``), the same median and trimmed
  mean against Flower's ``aggregate_median`` and ``aggregate_trimmed_avg`` (their own input
  form: one list of arrays per update, stacked by Flower inside the call, so timed);
- multi-Krum (f = 2, or N - 3 below 5 updates) and CenteredClip (3 iterations): the native
  backend against the same rule on the python backend (the NumPy kernels of
  ``aumai_fedtrain.robust``); skipped above ``--max-pairwise`` updates, where the NumPy
  pairwise distances take minutes.

Each figure is the fastest of ``--repeats`` runs, the contenders alternating; the load average
is printed before and after. The native timings include the rules' finite-value check. Run
from the repository root::

    python benches/bench_robust.py [--params 1000000] [--counts 8 16 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from aumai_fedtrain import robust
from aumai_fedtrain.backend import native_available

try:  # the bench extra; the script runs without it
    from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
except ImportError:
    aggregate_median = aggregate_trimmed_avg = None

Maps = list[dict[str, np.ndarray]]


FLOWER_MEDIAN = "Flower aggregate_median"
FLOWER_TRIMMED = "Flower aggregate_trimmed_avg"


def fastest(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` runs of each contender, in seconds, contenders alternating."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeats):
        for name, action in contenders.items():
            started = time.perf_counter()
            action()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def partition_median(stack: np.ndarray) -> np.ndarray:
    """The median by ``np.partition`` (the two middle values for an even count)."""
    count = len(stack)
    half = count // 2
    if count % 2:
        return np.asarray(np.partition(stack, half, axis=0)[half])
    parted = np.partition(stack, (half - 1, half), axis=0)
    return np.asarray((parted[half - 1] + parted[half]) * 0.5)


def partition_trimmed_mean(stack: np.ndarray, trim: int) -> np.ndarray:
    """The trimmed mean by ``np.partition`` (kept values in any order)."""
    count = len(stack)
    parted = np.partition(stack, (trim, count - trim - 1), axis=0)
    return np.asarray(parted[trim : count - trim].mean(axis=0))


def row(name: str, native: float, numpy_name: str, reference: float) -> str:
    return (
        f"| {name} | {native * 1e3:,.1f} | {numpy_name} | {reference * 1e3:,.1f} | "
        f"{reference / native:,.1f}x |"
    )


def bench(count: int, params: int, repeats: int, max_pairwise: int) -> list[str]:
    rng = np.random.default_rng(count)
    stack = rng.normal(size=(count, params))
    maps: Maps = [{"w": stack[i]} for i in range(count)]
    label = f"N={count} x P={params:,}"
    rows = []

    flower_results = [([stack[i]], 1) for i in range(count)]
    contenders: dict[str, Callable[[], object]] = {
        "native": lambda: robust.median(maps, "native"),
        "np.median": lambda: np.median(stack, axis=0),
        "np.partition": lambda: partition_median(stack),
    }
    if aggregate_median is not None:
        contenders[FLOWER_MEDIAN] = lambda: aggregate_median(flower_results)
    times = fastest(contenders, repeats)
    best_name = min(("np.median", "np.partition"), key=times.__getitem__)
    rows.append(row(f"median, {label}", times["native"], best_name, times[best_name]))
    if FLOWER_MEDIAN in times:
        rows.append(row(f"median, {label}", times["native"], FLOWER_MEDIAN, times[FLOWER_MEDIAN]))

    trim = max(1, count // 10)
    contenders = {
        "native": lambda: robust.trimmed_mean(maps, trim / count, "native"),
        "np.partition": lambda: partition_trimmed_mean(stack, trim),
    }
    if aggregate_trimmed_avg is not None:
        contenders[FLOWER_TRIMMED] = lambda: aggregate_trimmed_avg(flower_results, trim / count)
    times = fastest(contenders, repeats)
    for contender in ("np.partition", FLOWER_TRIMMED):
        if contender in times:
            rows.append(
                row(
                    f"trimmed mean (k={trim}), {label}",
                    times["native"],
                    contender,
                    times[contender],
                )
            )

    if count > max_pairwise:
        rows.append(f"| multi-Krum and CenteredClip, {label} | skipped (N > --max-pairwise) |")
        return rows
    f = min(2, count - 3)
    rules: dict[str, Callable[[str], object]] = {
        f"multi-Krum (f={f})": partial(robust.krum, maps, f, None),
        "CenteredClip (3 it.)": partial(robust.centered_clip, maps, None, 3),
    }
    for name, rule in rules.items():
        times = fastest(
            {"native": partial(rule, "native"), "NumPy": partial(rule, "python")},
            max(1, repeats // 2),
        )
        rows.append(row(f"{name}, {label}", times["native"], "NumPy", times["NumPy"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-pairwise", type=int, default=16)
    args = parser.parse_args()
    if not native_available():
        raise SystemExit("the native extension is not built: pip install -e .")

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if aggregate_median is None:
        print("Flower is not installed (pip install 'aumai-fedtrain[bench]'): no Flower rows")
    print("| rule, input | native (ms) | contender | contender (ms) | native speed-up |")
    print("|---|---:|---|---:|---:|")
    for count in args.counts:
        for line in bench(count, args.params, args.repeats, args.max_pairwise):
            print(line, flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
