"""Compressed updates at the coordinator, side by side in one run: the plain average of float64
and float32 updates against the average that dequantises each codec inside its pass.

Contenders, all on one backend (native by default), timed alternately (one call of each per
round, ``--repeats`` rounds) on N updates of one key of P values:

- ``weighted_average`` of float64 updates and of float32 updates;
- ``average_encoded`` of the same values (a float32 model) encoded with int8, int4, e3m0
  (blocks of ``--block`` values), fp16 and bf16.

Printed per contender: the median time, parameters (N x P) per second, GB/s of the input it
reads (the updates' bytes: codes and scales for a codec), and the ratio of its parameters per
second to the float64 average's (the issue's target: at least 2x for int8 and the 4-bit
codecs). Then each codec's quantise throughput (``encode`` of one update, median of the
repeats). The load average is printed before and after. Run from the repository root::

    python benches/bench_compression.py [--nodes 100] [--params 1000000] [--block 128]
                                        [--repeats 7] [--backend native] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from aumai_fedtrain.backend import get_backend
from aumai_fedtrain.compression import Codec, Encoded, average_encoded, encode

CODECS = ("int8", "int4", "e3m0", "fp16", "bf16")


def updates_of(nodes: int, params: int, seed: int = 0) -> list[np.ndarray]:
    """N distinct float64 updates of P values (pseudo-gradients of mixed magnitudes)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(params) * 10.0 ** rng.uniform(-4, -1) for _ in range(nodes)]


def contenders(
    values: list[np.ndarray], block: int, backend: str
) -> tuple[dict[str, Callable[[], object]], dict[str, int], dict[str, list[float]]]:
    """Each contender's call and input bytes, and each codec's encode times (one per node)."""
    average = get_backend(backend).weighted_average
    weights = [float(1 + i % 7) for i in range(len(values))]
    doubles = [{"w": v} for v in values]
    singles = [{"w": v.astype(np.float32)} for v in values]
    calls: dict[str, Callable[[], object]] = {
        "float64 weighted_average": lambda: average(doubles, weights),
        "float32 weighted_average": lambda: average(singles, weights),
    }
    read = {
        "float64 weighted_average": sum(v.nbytes for v in values),
        "float32 weighted_average": sum(s["w"].nbytes for s in singles),
    }
    encode_times: dict[str, list[float]] = {}
    for name in CODECS:
        codec = Codec(name, block)  # type: ignore[arg-type]
        encoded: list[dict[str, Encoded]] = []
        encode_times[name] = []
        for single in singles:
            started = time.perf_counter()
            encoded.append({"w": encode(single["w"], codec)})
            encode_times[name].append(time.perf_counter() - started)
        label = f"{name} average_encoded"
        calls[label] = encoded_average(encoded, weights, backend)
        read[label] = sum(update["w"].nbytes for update in encoded)
    return calls, read, encode_times


def encoded_average(
    encoded: list[dict[str, Encoded]], weights: list[float], backend: str
) -> Callable[[], object]:
    """A call of ``average_encoded`` on ``encoded``."""
    return lambda: average_encoded(encoded, weights, backend=backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", choices=("native", "python"), default="native")
    parser.add_argument("--quick", action="store_true", help="N=4 x P=10,000, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.params, args.repeats = 4, 10_000, 2

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    values = updates_of(args.nodes, args.params)
    calls, read, encode_times = contenders(values, args.block, args.backend)
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(args.repeats):
        for label, call in calls.items():
            started = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - started)

    count = args.nodes * args.params
    print(
        f"\naverage of N={args.nodes:,} x P={args.params:,} ({args.backend} backend, a float32 "
        f"model, blocks of {args.block}, {args.repeats} alternated runs each, median)\n"
    )
    print("| contender | time (ms) | parameters/s | input read | GB/s | vs float64 average |")
    print("|---|---|---|---|---|---|")
    base = count / statistics.median(times["float64 weighted_average"])
    for label, samples in times.items():
        median = statistics.median(samples)
        rate = count / median
        print(
            f"| {label} | {median * 1e3:.2f} | {rate / 1e9:.2f} G | {read[label] / 1e6:.1f} MB "
            f"| {read[label] / median / 1e9:.1f} | {rate / base:.2f}x |"
        )

    print(
        f"\nquantise (encode one update of P={args.params:,} float32, median of N={args.nodes})\n"
    )
    print("| codec | time (ms) | parameters/s |")
    print("|---|---|---|")
    for name, samples in encode_times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median * 1e3:.2f} | {args.params / median / 1e6:.1f} M |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
