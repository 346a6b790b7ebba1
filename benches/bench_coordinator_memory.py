"""Coordinator memory in a real HTTP round: the mean folded as updates arrive vs the round's list.

Starts ``--nodes`` real ``aumai-fedtrain node`` processes on 127.0.0.1 (as the network tests
start them: key files, a bearer token, signed requests and answers), whose trainer (this
module's :func:`make_trainer`) sends a float32 update of ``--values`` values, and runs
``--rounds`` rounds of the mean against them from this process, the coordinator. For each
round it reports the coordinator's resident memory high-water mark (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs`` before the round) above its resident memory when the round
starts, beside one update's size, twice: once all the round's updates are in (and, streamed,
folded), and over the whole round (the mean, the outer step and the evaluation included). It
also reports tracemalloc's peaks (Python and NumPy allocations); tracemalloc does not see the
native running sum's float64 accumulator (8 bytes a value), which Rust allocates, while RSS
does. ``--budget-answers K`` sets the HTTP provider's memory budget to K answers of the model
(the answers being read and decoded), which bounds what is in flight. ``--waiting-memory-mb
M`` sets the coordinator's allowance for updates waiting in memory for an earlier node's
(``DiLoCoCoordinator(waiting_memory=...)``, default 256 MiB); beyond it they wait on disk
(``--spill-dir``, default the temporary directory). ``--compression CODEC`` (``int8``,
``int4``, ...) makes the nodes answer compressed by that codec (blocks of ``--block-size``):
the coordinator then holds each update as its codes and scales, which it dequantises inside
the mean's folds.

``--list-path`` makes the coordinator collect the whole round before averaging, as it did
before the mean was streamed (and still does for the robust rules): the HTTP provider's
list of updates, screened, then ``weighted_average``. Run both, side by side::

    python benches/bench_coordinator_memory.py
    python benches/bench_coordinator_memory.py --list-path
    python benches/bench_coordinator_memory.py --budget-answers 2 --waiting-memory-mb 0
    python benches/bench_coordinator_memory.py --compression int8
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
import tracemalloc
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode
from aumai_fedtrain.compression import CODECS
from aumai_fedtrain.coordinator import DEFAULT_WAITING_MEMORY
from aumai_fedtrain.models import CompressionConfig, RoundRecord, TensorMap, TrainingConfig
from aumai_fedtrain.network import SAFETENSORS, HttpUpdateProvider, LocalNode
from aumai_fedtrain.robust import RobustAggregator

ROOT = Path(__file__).resolve().parent.parent
VALUES_VARIABLE = "AUMAI_BENCH_VALUES"
MIB = 1024 * 1024


def _values() -> int:
    return int(os.environ.get(VALUES_VARIABLE, "10000000"))


def initial_model(config: TrainingConfig) -> TensorMap:
    """One float32 tensor of ``$AUMAI_BENCH_VALUES`` zeros."""
    return {"w": np.zeros(_values(), dtype=np.float32)}


class ConstantTrainer:
    """A node whose pseudo-gradient is a constant of its own (training is not measured)."""

    def __init__(self, node_id: str, config: TrainingConfig) -> None:
        self.value = np.float32(1e-3 * (int(node_id.rsplit("-", 1)[-1]) + 1))
        self.samples = config.local_steps * config.batch_size

    def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
        gradients = {key: np.full_like(value, self.value) for key, value in parameters.items()}
        return gradients, float(self.value), self.samples

    def state_dict(self) -> TensorMap:
        return {}

    def load_state_dict(self, state: TensorMap) -> None:
        del state


def make_trainer(node_id: str, config: TrainingConfig) -> ConstantTrainer:
    """The nodes' trainer factory (``--trainer benches.bench_coordinator_memory:make_trainer``)."""
    return ConstantTrainer(node_id, config)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


class PeakMemory:
    """This process's memory peaks since :meth:`reset`, above where they stood then: the
    resident high-water mark (``VmHWM``) and tracemalloc's peak (Python and NumPy allocations;
    not the native running sum's accumulator, which Rust allocates)."""

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")
        tracemalloc.reset_peak()
        self.rss_kib = _status_kib("VmRSS")
        self.traced = tracemalloc.get_traced_memory()[0]

    def read(self) -> tuple[float, float]:
        """``(RSS growth, traced growth)`` in MiB."""
        rss = (_status_kib("VmHWM") - self.rss_kib) / 1024
        return rss, (tracemalloc.get_traced_memory()[1] - self.traced) / MIB


class MeasuredProvider(HttpUpdateProvider):
    """The HTTP provider, reading the peaks once the round's updates are all in (the
    coordinator asks for the round's failures then, before it averages or steps)."""

    def __init__(self, peak: PeakMemory, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peak = peak
        self.collected: list[tuple[float, float]] = []

    def round_failures(self, round_id: int) -> dict[str, str]:
        self.collected.append(self.peak.read())
        return super().round_failures(round_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--values", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--list-path", action="store_true", help="collect the round, then average")
    parser.add_argument(
        "--budget-answers",
        type=int,
        default=None,
        help="the round's memory budget, in answers of the model (default: the provider's)",
    )
    parser.add_argument(
        "--waiting-memory-mb",
        type=int,
        default=DEFAULT_WAITING_MEMORY // MIB,
        help="MiB of updates that may wait in memory for an earlier node's (default: 256)",
    )
    parser.add_argument("--spill-dir", type=Path, default=None, help="where the rest wait")
    parser.add_argument(
        "--compression", choices=CODECS, default="none", help="the codec the nodes answer with"
    )
    parser.add_argument("--block-size", type=int, default=128, help="values per scale")
    args = parser.parse_args()
    os.environ[VALUES_VARIABLE] = str(args.values)
    if args.list_path:
        RobustAggregator.streams = property(lambda self: False)  # type: ignore[method-assign,assignment]

    update_mib = args.values * 4 / MIB
    compression = CompressionConfig(codec=args.compression, block_size=args.block_size)
    config = TrainingConfig(
        num_nodes=args.nodes, global_rounds=args.rounds, compression=compression
    )
    tracemalloc.start()
    peak = PeakMemory()
    whole: list[tuple[float, float]] = []

    def round_done(record: RoundRecord) -> None:
        whole.append(peak.read())
        print(
            f"round {record.round_id}: {record.num_participants} updates, "
            f"{record.duration_seconds:.1f} s",
            flush=True,
        )
        peak.reset()

    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        token = secrets.token_hex(32)
        (Path(folder) / "token").write_text(token)
        keys: dict[str, bytes] = {}
        nodes: list[LocalNode] = []
        for index in range(args.nodes):
            node_id = f"node-{index}"
            keys[node_id] = secrets.token_hex(32).encode()
            key_file = Path(folder) / f"{node_id}.key"
            key_file.write_bytes(keys[node_id])
            trainer = "benches.bench_coordinator_memory:make_trainer"
            options = ["--token-file", f"{folder}/token", "--trainer", trainer]
            options += ["--max-body-mb", str(int(2 * update_mib) + 16), "--log-level", "warning"]
            node = LocalNode(node_id, key_file, options, cwd=ROOT, startup_timeout=300)
            stack.callback(node.stop)
            node.launch()  # all at once, then wait for each
            nodes.append(node)
        for node in nodes:
            node.wait_ready()
        provider = MeasuredProvider(
            peak,
            keys,
            token=token.encode(),
            timeout=600,
            model_init=initial_model,
            max_response_bytes=int(2 * update_mib + 16) * MIB,
        )
        if args.budget_answers is not None:
            one = provider.answer_memory(SAFETENSORS, args.values * 4 + 1024, initial_model(config))
            provider.memory_budget = args.budget_answers * one
        federated = [FederatedNode(node_id=n.node_id, address=n.address) for n in nodes]
        load = os.getloadavg()
        started = time.perf_counter()
        DiLoCoCoordinator(
            waiting_memory=args.waiting_memory_mb * MIB, spill_dir=args.spill_dir
        ).run_training(
            config,
            federated,
            provider,
            on_start=lambda state: peak.reset(),
            on_round=round_done,
            min_nodes=args.nodes,
        )
        seconds = time.perf_counter() - started

    path = "list (collect the round, then average)" if args.list_path else "streamed mean"
    budget = (
        f"memory budget {args.budget_answers} answers"
        if args.budget_answers is not None
        else "default memory budget"
    ) + f", waiting memory {args.waiting_memory_mb} MiB, compression {args.compression}"
    print(
        f"\n{args.nodes} nodes x {args.values:,} float32 values over HTTP on 127.0.0.1, {path}, "
        f"{budget}; one update: {update_mib:.1f} MiB\n"
        "| round | RSS peak, all in | RSS peak, round | tracemalloc peak, all in "
        "| tracemalloc peak, round |\n|---|---|---|---|---|"
    )
    rounds = zip(provider.collected, whole, strict=True)
    for round_id, (collected, done) in enumerate(rounds, start=1):
        cells = [
            f"{value:.0f} MiB ({value / update_mib:.1f}x)"
            for value in (collected[0], done[0], collected[1], done[1])
        ]
        print(f"| {round_id} | " + " | ".join(cells) + " |")
    print(
        f"{args.rounds} rounds in {seconds:.1f} s; load average before: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; Python {sys.version.split()[0]}"
    )


if __name__ == "__main__":
    main()
