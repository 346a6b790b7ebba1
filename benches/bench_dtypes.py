"""float32 against float64, side by side in one run: bytes moved, update memory, average speed.

1. A simulated run (``InProcessProvider``) of the same model in float64 and in float32: N nodes
   whose trainer takes a few gradient steps on ``0.5 * |theta - c_node|^2`` in the model's
   dtype, so the pseudo-gradients have the model's dtype, as a PyTorch node's do. Printed per
   round: the bytes each way from the run's ``RoundRecord`` (``bytes_to_nodes``,
   ``bytes_from_nodes``: the safetensors bodies the exchange takes, checked here against the
   length of really encoded bodies), and the coordinator's memory for the updates, measured as
   the ``nbytes`` of the update arrays it holds when it averages them (N x P x item size; the
   average's own result is printed beside it).
2. The native average (``weighted_average``) of N = 100 updates of P = 10^6 values, float64
   inputs against float32 inputs, timed alternately: GB/s of input read and parameters
   (N x P) per second, from the median and from the best of the repeats (on a machine shared
   with other work the best is the steadier comparison).

Ratios (float32 / float64) and the load average before and after are printed. Targets: half
the bytes, half the update memory, and a float32 average at least as fast per byte as float64.
Run from the repository root::

    python benches/bench_dtypes.py [--params 1000000] [--nodes 8] [--average-nodes 100]
                                   [--average-params 1000000] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, LocalUpdate, TrainingConfig
from aumai_fedtrain.backend import get_backend, native_available
from aumai_fedtrain.models import GlobalState, TensorMap
from aumai_fedtrain.network import SAFETENSORS, TrainRequest
from aumai_fedtrain.network.wire import encode_request, encode_update
from aumai_fedtrain.providers import InProcessProvider

DTYPES = (np.float64, np.float32)


class Descent:
    """A node's trainer: ``local_steps`` gradient steps on ``0.5 * |theta - c|^2``, in the
    parameters' dtype (``c`` a constant of the node)."""

    def __init__(self, node_id: str, config: TrainingConfig) -> None:
        self.centre = (int(node_id.rsplit("-", 1)[1]) % 7) / 7.0 - 0.5
        self.config = config

    def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
        delta = {}
        for key, theta in parameters.items():
            local = theta.copy()
            for _ in range(self.config.local_steps):
                local -= self.config.learning_rate * (local - self.centre)
            delta[key] = theta - local
        samples = self.config.local_steps * self.config.batch_size
        return delta, 0.5 * (1.0 + self.centre**2), samples

    def state_dict(self) -> TensorMap:
        return {}

    def load_state_dict(self, state: TensorMap) -> None:
        pass


class RecordingProvider(InProcessProvider):
    """An in-process provider that keeps the size of the updates it hands the coordinator."""

    def __init__(self, params: int, dtype: type[np.floating]) -> None:
        super().__init__(Descent, model_init=lambda config: model(params, dtype))
        self.update_bytes: list[int] = []
        self.last: list[LocalUpdate] = []

    def get_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> list[LocalUpdate]:
        self.last = super().get_updates(round_id, state, nodes)
        self.update_bytes.append(
            sum(value.nbytes for update in self.last for value in update.gradients.values())
        )
        return self.last


def model(params: int, dtype: type[np.floating]) -> TensorMap:
    """A model of ``params`` values in two tensors, all of ``dtype``."""
    rng = np.random.default_rng(0)
    bias = min(params // 2, 1000)
    return {
        "layer.weight": rng.standard_normal(params - bias).astype(dtype),
        "layer.bias": np.zeros(bias, dtype=dtype),
    }


def simulated_run(
    params: int, nodes: int, dtype: type[np.floating]
) -> tuple[int, int, int, int, bool]:
    """Round 1 of a 3-round run: bytes to and from the nodes, update bytes held at the average,
    the average's bytes, and whether the records' bytes equal really encoded bodies."""
    config = TrainingConfig(
        model_name=f"bench-{np.dtype(dtype).name}", learning_rate=0.1, batch_size=8,
        local_steps=3, global_rounds=3, num_nodes=nodes,
    )  # fmt: skip
    members = [FederatedNode(node_id=f"node-{index}") for index in range(nodes)]
    provider = RecordingProvider(params, dtype)
    result = DiLoCoCoordinator().run_training(config, members, provider)
    record = result.history[-1]
    assert record.bytes_to_nodes is not None and record.bytes_from_nodes is not None
    averaged = sum(value.nbytes for value in result.final_state.global_weights.values())
    request = TrainRequest(round_id=record.round_id, global_weights=model(params, dtype))
    encoded_to = len(encode_request(request, SAFETENSORS)) * nodes
    encoded_from = sum(len(encode_update(update, SAFETENSORS)) for update in provider.last)
    matches = record.bytes_to_nodes == encoded_to and record.bytes_from_nodes == encoded_from
    return (
        record.bytes_to_nodes,
        record.bytes_from_nodes,
        provider.update_bytes[-1],
        averaged,
        matches,
    )


def average_speed(nodes: int, params: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each timed native average of ``nodes`` updates of ``params`` values, per
    dtype, the dtypes timed alternately."""
    backend = get_backend("native" if native_available() else "python")
    rng = np.random.default_rng(1)
    base = [rng.standard_normal(params) for _ in range(nodes)]
    inputs = {
        np.dtype(dtype).name: [{"w": value.astype(dtype)} for value in base] for dtype in DTYPES
    }
    del base
    weights = rng.uniform(1.0, 100.0, nodes).tolist()
    times: dict[str, list[float]] = {name: [] for name in inputs}
    for repeat in range(repeats + 1):  # the first run of each is a warm-up
        for name, updates in inputs.items():
            started = time.perf_counter()
            backend.weighted_average(updates, weights)
            elapsed = time.perf_counter() - started
            if repeat:
                times[name].append(elapsed)
    return times


def ratio_row(label: str, values: Sequence[float], unit: str, digits: int = 1) -> str:
    wide, narrow = values
    cells = [f"{value:,.{digits}f} {unit}" for value in (wide, narrow)]
    return f"| {label} | {cells[0]} | {cells[1]} | {narrow / wide:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="Values of the run's model.")
    parser.add_argument("--nodes", type=int, default=8, help="Nodes of the simulated run.")
    parser.add_argument("--average-nodes", type=int, default=100, help="N of the average.")
    parser.add_argument("--average-params", type=int, default=1_000_000, help="P of the average.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed averages per dtype.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (a smoke test).")
    options = parser.parse_args()
    if options.quick:
        options.params, options.nodes = 10_000, 3
        options.average_nodes, options.average_params, options.repeats = 4, 10_000, 1

    load_before = os.getloadavg()
    runs = [simulated_run(options.params, options.nodes, dtype) for dtype in DTYPES]
    speeds = average_speed(options.average_nodes, options.average_params, options.repeats)
    load_after = os.getloadavg()

    backend = "native" if native_available() else "python"
    print(
        f"float64 vs float32; backend {backend}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after"
    )
    print(
        f"\nsimulated run: {options.nodes} nodes, a model of {options.params:,} values, "
        "round 3 of 3 (bytes: the run's RoundRecord; update memory: the nbytes of the update "
        "arrays the coordinator holds at the average)\n"
    )
    print("| measure | float64 | float32 | float32 / float64 |")
    print("| --- | ---: | ---: | ---: |")
    print(ratio_row("bytes to the nodes", [run[0] / 1e6 for run in runs], "MB", 2))
    print(ratio_row("bytes from the nodes", [run[1] / 1e6 for run in runs], "MB", 2))
    print(ratio_row("updates held at the average", [run[2] / 1e6 for run in runs], "MB", 2))
    print(ratio_row("the average's result", [run[3] / 1e6 for run in runs], "MB", 2))
    checked = "yes" if all(run[4] for run in runs) else "NO"
    print(f"\nrecords equal the lengths of really encoded safetensors bodies: {checked}")

    values = options.average_nodes * options.average_params
    read = [values * np.dtype(dtype).itemsize for dtype in DTYPES]
    print(
        f"\n{backend} weighted_average, N={options.average_nodes} x "
        f"P={options.average_params:,} ({options.repeats} runs per dtype)\n"
    )
    print("| measure | float64 | float32 | float32 / float64 |")
    print("| --- | ---: | ---: | ---: |")
    for label, pick in (("median", statistics.median), ("best", min)):
        seconds = [pick(speeds[np.dtype(dtype).name]) for dtype in DTYPES]
        rates = [size / s / 1e9 for size, s in zip(read, seconds, strict=True)]
        print(ratio_row(f"time, {label}", [s * 1e3 for s in seconds], "ms"))
        print(ratio_row(f"input read, {label}", rates, "GB/s", 2))
        print(ratio_row(f"parameters, {label}", [values / s / 1e9 for s in seconds], "G/s", 3))
    print(
        "\ntargets: bytes and update memory ratios about 0.5; input GB/s ratio at least 1.0 "
        "(as fast per byte)"
    )


if __name__ == "__main__":
    main()
