"""Side-by-side benchmark of the native hot paths against their limits and their contenders.

Every contender of a workload runs in the same loop of interleaved repetitions, and the tables
give the median time per call. Before timing, native results are checked against the reference
(digests against ``json.dumps`` + ``hashlib`` or the pure-Python fallback, averages byte for
byte against the fallback). In one run it prints:

- the canonical hash of 10^6 float64 against the SHA-256 floor (``hashlib.sha256`` over the
  same JSON text, already written) and against the ``json.dumps`` + ``hashlib`` reference;
  many small maps hashed at once against one call per map;
- the wire digest of 10^6 float64 in GB/s of tensor bytes, against ``hashlib`` over the raw
  bytes;
- the read-bandwidth limit: a native 2-thread scan (``max_abs``, the screening kernel) over
  1 GiB of float64, and what fraction of it the average reaches;
- the weighted average for N nodes x P values (float64 and float32), for 100 nodes x a model of
  200 tensors (with the time spent reading the 20,000 array arguments), for the simulation's
  1,000 nodes x 11,018 parameters, and pinned to one core, against NumPy's best streaming
  average;
- the screening scan of 1,000 updates against v0.2's per-tensor NumPy check;
- saving a 1,000-node checkpoint (177 MB) against the save path of a git revision (by default
  ``main`` before issue 11), with the time of the digest alone.

Usage::

    python benches/bench_hot_paths.py            # the full run recorded in docs/performance.md
    python benches/bench_hot_paths.py --quick    # tiny smoke run

Measure the extension as users install it (``pip install .``: a portable build, no
``-C target-cpu=native``; AVX2 is chosen at run time) on a quiet machine: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aumai_fedtrain import checkpoint
from aumai_fedtrain.backend import get_backend
from aumai_fedtrain.models import GlobalState, RoundRecord, TrainingConfig

REPOSITORY = Path(__file__).resolve().parent.parent
BASELINE_REVISION = "25c17f3"
"""``main`` when issue 11 was taken up: the checkpoint save path the new one is compared with."""

MLP_SHAPES = {
    "layer1.weight": (256, 32),
    "layer1.bias": (256,),
    "layer2.weight": (10, 256),
    "layer2.bias": (10,),
}
"""The built-in simulation's model (11,018 parameters)."""


@dataclass(frozen=True)
class Row:
    """One table row: a workload, its contender, the two median timings and the target.

    ``floor`` rows compare with a limit (the contender is the floor: lower ratios are better,
    the target is the most native / floor may be); other rows are speed-ups (contender /
    native, the target the least it may be).
    """

    workload: str
    contender: str
    contender_s: float
    native_s: float
    target: float | None = None
    floor: bool = False

    @property
    def ratio(self) -> float:
        if self.floor:
            return self.native_s / self.contender_s
        return self.contender_s / self.native_s

    def verdict(self) -> str:
        if self.target is None:
            return "-"
        met = self.ratio <= self.target if self.floor else self.ratio >= self.target
        sign = "<=" if self.floor else ">="
        return f"{sign} {self.target:g}x: {'met' if met else 'NOT met'}"


def count(n: int) -> str:
    """``10^k`` for a power of ten, else the number with thousands separators."""
    digits = str(n)
    return f"10^{len(digits) - 1}" if digits.rstrip("0") == "1" else f"{n:,}"


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


def json_text(gradients: dict[str, Any]) -> bytes:
    plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in gradients.items()}
    return json.dumps(plain, sort_keys=True).encode("utf-8")


def reference_hash(gradients: dict[str, Any]) -> str:
    """The contract's definition: ``.tolist()`` for arrays, then json.dumps and SHA-256."""
    return hashlib.sha256(json_text(gradients)).hexdigest()


def cpu_medians(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median CPU time (s, all threads of the process) per call of each contender.

    Unlike wall time, it hardly depends on the load of the machine: it measures the work, and
    on idle cores a call on two threads takes about half of its CPU time.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def bench_hash(size: int, repeats: int) -> tuple[list[Row], str]:
    """The hash rows, and a line on the CPU time of the array hash against the floor's."""
    native = get_backend("native")
    values = np.random.default_rng(0).standard_normal(size)
    text = json_text({"w": values})
    array = {"w": values}
    cpu = cpu_medians(
        {
            "floor": lambda: hashlib.sha256(text).hexdigest(),
            "native": lambda: native.canonical_hash(array),
        },
        max(repeats, 15),
    )
    cpu_line = (
        f"- canonical_hash, {count(size)} float64 as array: {milliseconds(cpu['native'])} ms "
        f"of CPU time (all threads) against {milliseconds(cpu['floor'])} ms for the floor, "
        f"{cpu['native'] / cpu['floor']:.2f}x: on two idle cores, with the work split evenly "
        f"between two threads, the wall-time ratio would be {cpu['native'] / cpu['floor'] / 2:.2f}x"
    )
    rows = []
    for form, data in [("array", values), ("list", values.tolist())]:
        gradients = {"w": data}
        assert native.canonical_hash(gradients) == reference_hash(gradients)
        timings = medians(
            {
                "floor": lambda: hashlib.sha256(text).hexdigest(),
                "json": lambda g=gradients: reference_hash(g),
                "native": lambda g=gradients: native.canonical_hash(g),
            },
            repeats,
        )
        workload = f"canonical_hash, {count(size)} float64 as {form}"
        full = size == 10**6
        if form == "array":
            rows.append(
                Row(
                    workload,
                    f"SHA-256 floor: hashlib over the same JSON text ({len(text) / 1e6:.1f} MB)",
                    timings["floor"],
                    timings["native"],
                    1.4 if full else None,
                    floor=True,
                )
            )
        rows.append(
            Row(
                workload,
                "json.dumps + hashlib" + (" (with .tolist())" if form == "array" else ""),
                timings["json"],
                timings["native"],
                (25.0 if form == "array" else 8.0) if full else None,
            )
        )
    return rows, cpu_line


def bench_many_hashes(nodes: int, repeats: int) -> Row:
    native = get_backend("native")
    maps = [mlp_update(np.random.default_rng(i)) for i in range(nodes)]
    assert native.canonical_hashes(maps[:3]) == [reference_hash(m) for m in maps[:3]]
    timings = medians(
        {
            "loop": lambda: [native.canonical_hash(m) for m in maps],
            "batch": lambda: native.canonical_hashes(maps),
        },
        repeats,
    )
    return Row(
        f"canonical_hashes, {count(nodes)} updates of 11,018 float64",
        "canonical_hash called once per update",
        timings["loop"],
        timings["batch"],
    )


def bench_wire_digest(size: int, repeats: int) -> tuple[Row, float]:
    native = get_backend("native")
    values = np.random.default_rng(1).standard_normal(size)
    gradients = {"w": values}
    assert native.wire_digest(gradients) == get_backend("python").wire_digest(gradients)
    timings = medians(
        {
            "floor": lambda: hashlib.sha256(values.data).hexdigest(),
            "native": lambda: native.wire_digest(gradients),
        },
        repeats,
    )
    row = Row(
        f"wire_digest, {count(size)} float64 ({values.nbytes / 1e6:.0f} MB)",
        "SHA-256 floor: hashlib over the raw bytes",
        timings["floor"],
        timings["native"],
        floor=True,
    )
    return row, values.nbytes / timings["native"] / 1e9


def numpy_scaled_add(arrays: list[np.ndarray], coefficients: list[float]) -> np.ndarray:
    """NumPy streaming average: ``acc += c * a`` (a temporary per node)."""
    acc = np.zeros(arrays[0].shape)
    for array, c in zip(arrays, coefficients, strict=True):
        acc += c * array
    return acc


def numpy_preallocated(arrays: list[np.ndarray], coefficients: list[float]) -> np.ndarray:
    """NumPy streaming average into preallocated buffers: ``multiply`` then ``add``."""
    acc = np.zeros(arrays[0].shape)
    tmp = np.empty_like(acc)
    for array, c in zip(arrays, coefficients, strict=True):
        np.multiply(array, c, out=tmp)
        np.add(acc, tmp, out=acc)
    return acc


def numpy_average(updates: list[dict[str, np.ndarray]], weights: list[float], method: Any) -> Any:
    total = sum(weights)
    coefficients = [w / total for w in weights]
    return {key: method([u[key] for u in updates], coefficients) for key in updates[0]}


@dataclass
class AverageRun:
    row: Row
    native_s: float
    read_bytes: int


def bench_average(
    label: str, updates: list[dict[str, np.ndarray]], repeats: int, target: float | None = None
) -> AverageRun:
    native = get_backend("native")
    weights = np.random.default_rng(len(updates)).uniform(1.0, 100.0, len(updates)).tolist()
    # Both backends compute the specified sequence of roundings: the same bytes.
    expected = get_backend("python").weighted_average(updates, weights)
    result = native.weighted_average(updates, weights)
    assert all(result[k].tobytes() == expected[k].tobytes() for k in expected)
    timings = medians(
        {
            "acc += c * a": lambda: numpy_average(updates, weights, numpy_scaled_add),
            "multiply/add into buffers": lambda: numpy_average(
                updates, weights, numpy_preallocated
            ),
            "native": lambda: native.weighted_average(updates, weights),
        },
        repeats,
    )
    native_s = timings.pop("native")
    best = min(timings, key=timings.__getitem__)
    read = sum(value.nbytes for update in updates for value in update.values())
    row = Row(label, f"best NumPy: {best}", timings[best], native_s, target)
    return AverageRun(row, native_s, read)


def uniform_updates(
    nodes: int, keys: int, size: int, dtype: Any = np.float64
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(nodes * 7 + size)
    return [
        {f"layer{k}": rng.standard_normal(size).astype(dtype) for k in range(keys)}
        for _ in range(nodes)
    ]


def mlp_update(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {key: rng.standard_normal(shape) * 1e-2 for key, shape in MLP_SHAPES.items()}


def argument_time(updates: list[dict[str, np.ndarray]], repeats: int) -> float:
    """Time of a native average whose arrays have one element each: reading the arguments
    (and building the result), without the arithmetic."""
    native = get_backend("native")
    tiny = [{key: value[:1] for key, value in update.items()} for update in updates]
    weights = [1.0] * len(tiny)
    return medians({"tiny": lambda: native.weighted_average(tiny, weights)}, repeats)["tiny"]


def read_bandwidth(
    gib: float, updates: list[dict[str, np.ndarray]], repeats: int
) -> tuple[float, float]:
    """GB/s of a native scan (``max_abs``: read and compare, nothing written) of ``gib`` GiB of
    float64 on as many threads as this process may use, and GB/s that the native average of
    ``updates`` reads, timed in the same repetition loop."""
    native = get_backend("native")
    values = np.random.default_rng(2).standard_normal(int(gib * 2**27))
    scan = {"w": values}
    weights = [1.0] * len(updates)
    read = sum(value.nbytes for update in updates for value in update.values())
    seconds = medians(
        {
            "scan": lambda: native.max_abs([scan]),
            "average": lambda: native.weighted_average(updates, weights),
        },
        repeats,
    )
    return values.nbytes / seconds["scan"] / 1e9, read / seconds["average"] / 1e9


@contextmanager
def one_core() -> Iterator[int]:
    """Pin this process (and the threads it starts) to one core for the block."""
    saved = os.sched_getaffinity(0)
    core = min(saved)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, saved)


def python_screening(updates: list[dict[str, np.ndarray]], bound: float) -> list[str | None]:
    """v0.2's screening check: per tensor, NumPy ``max`` and ``min`` compared with the bound."""
    problems: list[str | None] = []
    for gradients in updates:
        problem = None
        for key, value in gradients.items():
            largest, smallest = value.max(), value.min()
            if not (largest <= bound and smallest >= -bound):
                problem = key
                break
        problems.append(problem)
    return problems


def bench_screening(nodes: int, repeats: int) -> Row:
    native = get_backend("native")
    updates = [mlp_update(np.random.default_rng(i)) for i in range(nodes)]
    timings = medians(
        {
            "python": lambda: python_screening(updates, 1e4),
            "native": lambda: native.max_abs(updates),
        },
        repeats,
    )
    return Row(
        f"screening scan, {count(nodes)} updates of 11,018 float64",
        "v0.2: NumPy max and min per tensor",
        timings["python"],
        timings["native"],
    )


def checkpoint_fields(nodes: int) -> dict[str, Any]:
    """What a run of ``nodes`` simulated nodes checkpoints after a round: the MLP's parameters,
    momentum and last update, and every node's AdamW moments (177 MB for 1,000 nodes)."""
    rng = np.random.default_rng(3)
    params = mlp_update(rng)
    ids = [f"node-{i}" for i in range(nodes)]
    provider = {}
    for node in ids:
        provider[f"node/{node}/steps"] = np.array([10.0])
        for key, shape in MLP_SHAPES.items():
            provider[f"node/{node}/m/{key}"] = rng.standard_normal(shape)
            provider[f"node/{node}/v/{key}"] = rng.standard_normal(shape) ** 2
    record = RoundRecord(
        round_id=1,
        avg_loss=1.0,
        total_samples=320 * nodes,
        num_participants=nodes,
        duration_seconds=3.0,
    )
    return {
        "config": TrainingConfig(num_nodes=nodes, global_rounds=3),
        "node_ids": ids,
        "state": GlobalState(round_id=1, parameters=params, momentum=params, global_weights=params),
        "credits": dict.fromkeys(ids, 320),
        "history": [record],
        "elapsed": 3.0,
        "provider_state": provider,
    }


def baseline_module(revision: str) -> types.ModuleType | None:
    """``aumai_fedtrain/checkpoint.py`` as it was at ``revision`` (None without git)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{revision}:python/aumai_fedtrain/checkpoint.py"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("checkpoint_baseline")
    sys.modules[module.__name__] = module  # pydantic resolves the model's annotations there
    exec(compile(source, f"{revision}:checkpoint.py", "exec"), module.__dict__)
    return module


def bench_checkpoint(nodes: int, repeats: int, revision: str) -> tuple[list[Row], float]:
    fields = checkpoint_fields(nodes)
    current = checkpoint.Checkpoint(**fields)
    tensors = checkpoint._flatten(current)
    size = sum(t.nbytes for t in tensors.values())
    baseline = baseline_module(revision)
    with tempfile.TemporaryDirectory() as new_dir, tempfile.TemporaryDirectory() as old_dir:
        contenders = {"native": lambda: checkpoint.save_checkpoint(new_dir, current)}
        if baseline is not None:
            old = baseline.Checkpoint(**fields)
            contenders["baseline"] = lambda: baseline.save_checkpoint(old_dir, old)
        contenders["digest"] = lambda: checkpoint._digest(tensors, "{}")
        timings = medians(contenders, repeats)
        restored = checkpoint.load_checkpoint(new_dir)
        assert restored is not None and restored.node_ids == current.node_ids
    label = f"save_checkpoint, {count(nodes)} nodes ({size / 1e6:.0f} MB of tensors)"
    rows = []
    if baseline is not None:
        rows.append(
            Row(
                label,
                f"the save path of {revision} (digest, then write)",
                timings["baseline"],
                timings["native"],
                1.5 if nodes == 1000 else None,
            )
        )
    return rows, timings["digest"]


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
        f"{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable); "
        f"Python {platform.python_version()}; NumPy {np.__version__}; "
        f"{platform.system()} {platform.machine()}"
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
        "| Workload | Contender | Contender (ms) | Native (ms) | Ratio | Target |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        ratio = f"{row.ratio:.2f}x the floor" if row.floor else f"{row.ratio:.1f}x faster"
        lines.append(
            f"| {row.workload} | {row.contender} | {milliseconds(row.contender_s)} | "
            f"{milliseconds(row.native_s)} | {ratio} | {row.verdict()} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per contender")
    parser.add_argument(
        "--baseline",
        default=BASELINE_REVISION,
        help="git revision whose checkpoint save path is the contender (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    if args.quick:
        hash_size, sizes, node_counts, repeats = 10**4, [10**3], [2, 3], 2
        big, many, model_keys, scan_gib, ckpt_nodes = 10**3, 20, 5, 1 / 64, 20
    else:
        hash_size, sizes, node_counts, repeats = 10**6, [10**4, 10**6], [2, 10, 100], 7
        big, many, model_keys, scan_gib, ckpt_nodes = 10**6, 1000, 200, 1.0, 1000
    repeats = args.repeats or repeats

    command = shlex.join(["python", *sys.argv])
    print(f"Machine: {machine()}")
    print(f"Command: `{command}` (median of {repeats} interleaved repetitions)")
    print(f"Load average before: {load_average()}")

    rows, hash_cpu_line = bench_hash(hash_size, repeats)
    rows.append(bench_many_hashes(many, repeats))
    wire_row, wire_gbs = bench_wire_digest(hash_size, repeats)
    rows.append(wire_row)

    average_runs = [
        bench_average(
            f"weighted_average, N={n} x P={count(p)} float64",
            uniform_updates(n, 1, p),
            repeats,
            1.8 if (n, p) == (100, 10**6) else None,
        )
        for p in sizes
        for n in node_counts
    ]
    bandwidth, reached = read_bandwidth(
        scan_gib, uniform_updates(node_counts[-1], 1, sizes[-1]), repeats
    )
    average_runs.append(
        bench_average(
            f"weighted_average, N={node_counts[-1]} x P={count(big)} float32",
            uniform_updates(node_counts[-1], 1, big, np.float32),
            repeats,
        )
    )
    average_runs.append(
        bench_average(
            f"weighted_average, N={10 * node_counts[-1]} x P={count(big // 10)} float64",
            uniform_updates(10 * node_counts[-1], 1, big // 10),
            repeats,
        )
    )
    model = uniform_updates(node_counts[-1], model_keys, big // model_keys)
    model_run = bench_average(
        f"weighted_average, N={node_counts[-1]} x {model_keys} tensors of "
        f"{count(big // model_keys)} float64",
        model,
        repeats,
        2.2 if model_keys == 200 else None,
    )
    arguments_s = argument_time(model, repeats)
    del model
    average_runs.append(model_run)
    mlp_updates = [mlp_update(np.random.default_rng(i)) for i in range(many)]
    average_runs.append(
        bench_average(
            f"weighted_average, N={count(many)} x the simulation's MLP (11,018 float64)",
            mlp_updates,
            repeats,
        )
    )
    with one_core() as core:
        pinned = bench_average(
            f"weighted_average, N={node_counts[-1]} x P={count(sizes[-1])} float64, "
            f"pinned to core {core}",
            uniform_updates(node_counts[-1], 1, sizes[-1]),
            repeats,
            1.2 if sizes[-1] == 10**6 else None,
        )
    average_runs.append(pinned)
    rows += [run.row for run in average_runs]
    rows.append(bench_screening(many, repeats))
    checkpoint_rows, digest_s = bench_checkpoint(ckpt_nodes, max(3, repeats // 2), args.baseline)
    rows += checkpoint_rows
    print(f"Load average after: {load_average()}")
    print()
    print(table(rows))
    print()
    print(hash_cpu_line)
    print(f"- wire_digest: {wire_gbs:.2f} GB/s of tensor bytes (target >= 1 GB/s)")
    print(
        f"- read bandwidth: a native scan of {scan_gib:g} GiB float64 on "
        f"{len(os.sched_getaffinity(0))} threads reads {bandwidth:.1f} GB/s; timed in the same "
        f"loop, the average at N={node_counts[-1]} x P={count(sizes[-1])} float64 reads "
        f"{reached:.1f} GB/s, {100 * reached / bandwidth:.0f}% of it (target >= 75%)"
    )
    kernel_s = model_run.native_s - arguments_s
    print(
        f"- {model_run.row.workload}: {milliseconds(model_run.native_s)} ms = "
        f"{milliseconds(arguments_s)} ms reading the {node_counts[-1] * model_keys:,} array "
        f"arguments and building the result (the same call on 1-element arrays) + "
        f"{milliseconds(kernel_s)} ms of arithmetic "
        f"({model_run.read_bytes / max(kernel_s, 1e-9) / 1e9:.1f} GB/s read)"
    )
    print(
        f"- checkpoint digest alone (hashlib over views of every tensor): "
        f"{milliseconds(digest_s)} ms; the new save computes it while it writes"
    )
    if not checkpoint_rows:
        print(f"- no checkpoint baseline: git cannot show {args.baseline} here")
    return 0 if all(math.isfinite(row.ratio) for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
