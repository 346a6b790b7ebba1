"""Round trip of a 10^6-float update over loopback: JSON vs the binary (safetensors) wire format.

Starts a real node (``aumai-fedtrain node`` in a child process, with :class:`ScaledCopy` as its
trainer so that training costs next to nothing), then times ``HttpUpdateProvider.get_updates``
against it with each wire format, alternating the formats run by run: the request carries the
10^6 global weights, the answer a 10^6-float pseudo-gradient. A round trip includes encoding and
decoding both bodies, HTTP over loopback, and signing (node) and verifying (coordinator) the
update, which computes the gradients' wire digest twice on the active hot-path backend whatever
the wire format. The table also shows the four body codecs of a round trip timed on their own,
the two wire digests, and for comparison the two canonical JSON hashes that version 1
signatures cost. Run from the repository root (with the ``http`` extra installed)::

    python benches/bench_wire.py [--floats 1000000] [--repeats 7]

``AUMAI_FEDTRAIN_BACKEND=python|native`` selects the backend of both sides.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from aumai_fedtrain import FederatedNode, GlobalState, LocalUpdate, TrainingConfig
from aumai_fedtrain.backend import ENV_VAR, native_available
from aumai_fedtrain.models import TensorMap
from aumai_fedtrain.network import JSON, SAFETENSORS, HttpUpdateProvider, LocalNode, TrainRequest
from aumai_fedtrain.network.wire import decode_request, decode_update, encode_request, encode_update
from aumai_fedtrain.verification import HashVerifier

WIRES: dict[str, Literal["json", "binary"]] = {"JSON": "json", "binary": "binary"}
MEDIA = {"JSON": JSON, "binary": SAFETENSORS}


class ScaledCopy:
    """The node's trainer here: a pseudo-gradient of the weights' size at almost no cost."""

    def __init__(self, node_id: str, config: TrainingConfig) -> None:
        self.node_id = node_id

    def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
        return {key: value * 1e-3 for key, value in parameters.items()}, 1.0, 1

    def state_dict(self) -> TensorMap:
        return {}

    def load_state_dict(self, state: TensorMap) -> None:
        pass


def seconds(action: Callable[[], object]) -> float:
    """Wall time of one run of ``action``."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def codecs(weights: TensorMap, fmt: str) -> None:
    """Encode and decode a request and an update, as one round trip does."""
    request = encode_request(TrainRequest(round_id=1, global_weights=weights), fmt)
    decode_request(request, fmt)
    update = LocalUpdate(node_id="n", round_id=1, gradients=weights, loss=1.0, samples_used=1)
    decode_update(encode_update(update, fmt), fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--floats", type=int, default=1_000_000, help="Values in the update.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed runs per measurement.")
    options = parser.parse_args()

    weights = {"w": np.random.default_rng(0).standard_normal(options.floats)}
    state = GlobalState(round_id=0, parameters=weights)
    request = TrainRequest(round_id=1, global_weights=weights)
    hasher = HashVerifier()
    times: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as folder:
        key_file = Path(folder) / "bench.key"
        key_file.write_text(secrets.token_hex(32))
        key_file.chmod(0o600)  # (the node warns about a key others may read)
        keys = {"bench": key_file.read_text().encode()}
        arguments = ["--trainer", "bench_wire:ScaledCopy"]
        with LocalNode("bench", key_file, arguments, cwd=Path(__file__).parent) as node:
            nodes = [FederatedNode(node_id="bench", address=node.address)]
            providers = {name: HttpUpdateProvider(keys, wire=wire) for name, wire in WIRES.items()}
            for repeat in range(options.repeats + 1):  # the first run of each is a warm-up
                for name, fmt in MEDIA.items():
                    trip = seconds(lambda name=name: providers[name].get_updates(1, state, nodes))
                    codec = seconds(lambda fmt=fmt: codecs(weights, fmt))
                    if repeat:
                        times[f"trip {name}"].append(trip)
                        times[f"codecs {name}"].append(codec)
                digest = seconds(lambda: hasher.wire_digest(weights))
                hashing = seconds(lambda: hasher.compute_hash(weights))
                if repeat:
                    times["digest"].append(digest)
                    times["hash"].append(hashing)

    median = {label: statistics.median(values) * 1e3 for label, values in times.items()}
    backend = os.environ.get(ENV_VAR) or ("native" if native_available() else "python")
    print(
        f"update of {options.floats:,} float64 values over loopback; backend {backend}; "
        f"median of {options.repeats} runs"
    )
    print(f"{'':40}{'JSON':>10}{'binary':>10}{'ratio':>9}")
    rows = [
        ("request body (MB)", *(len(encode_request(request, fmt)) / 1e6 for fmt in MEDIA.values())),
        ("/train round trip (ms)", median["trip JSON"], median["trip binary"]),
        ("  its 4 body codecs alone (ms)", median["codecs JSON"], median["codecs binary"]),
        ("  its 2 wire digests (ms)", 2 * median["digest"], 2 * median["digest"]),
        ("  (v1: 2 canonical hashes) (ms)", 2 * median["hash"], 2 * median["hash"]),
    ]
    for label, json_value, binary_value in rows:
        print(f"{label:40}{json_value:10.1f}{binary_value:10.1f}{json_value / binary_value:8.1f}x")


if __name__ == "__main__":
    main()
