"""Hostile nodes: trainers for ``aumai-fedtrain node --trainer tests.hostile_nodes:<factory>``,
an answer of 1.6 million empty tensors (``python -m tests.hostile_nodes COUNT`` serves it) and
a flood of idle connections.

Each hostile trainer trains honestly (the built-in simulation's trainer) and then corrupts what
it returns; the node signs the result with its valid key, so only the coordinator's screening
can stop it.
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from aumai_fedtrain.models import TensorMap, TrainingConfig
from aumai_fedtrain.network import LocalNode
from aumai_fedtrain.simulation import SimulationTrainer
from aumai_fedtrain.trainer import TrainResult

Corruption = Callable[[TrainResult], TrainResult]


class HostileTrainer:
    """The built-in trainer of ``node_id``, with ``corrupt`` applied to every result."""

    def __init__(self, node_id: str, config: TrainingConfig, corrupt: Corruption) -> None:
        self.honest = SimulationTrainer(node_id, config)
        self.corrupt = corrupt

    def train(self, round_id: int, parameters: TensorMap) -> TrainResult:
        return self.corrupt(self.honest.train(round_id, parameters))

    def state_dict(self) -> TensorMap:
        return self.honest.state_dict()

    def load_state_dict(self, state: TensorMap) -> None:
        self.honest.load_state_dict(state)


def huge_loss(node_id: str, config: TrainingConfig) -> HostileTrainer:
    """Reports a loss of 1e308 (finite, so it passes the node's own checks)."""
    return HostileTrainer(node_id, config, lambda result: (result[0], 1e308, result[2]))


def huge_samples(node_id: str, config: TrainingConfig) -> HostileTrainer:
    """Claims 10**18 samples a round, to take (almost) all the credit and weight."""
    return HostileTrainer(node_id, config, lambda result: (result[0], result[1], 10**18))


def huge_gradients(node_id: str, config: TrainingConfig) -> HostileTrainer:
    """Sends 1.7e308 for every value, to overflow the average and the weights."""

    def corrupt(result: TrainResult) -> TrainResult:
        gradients = {key: np.full_like(value, 1.7e308) for key, value in result[0].items()}
        return gradients, result[1], result[2]

    return HostileTrainer(node_id, config, corrupt)


def empty_tensors_answer(count: int) -> bytes:
    """An HTTP answer holding a safetensors update of ``count`` empty tensors.

    1.6 million of them make a 95 MB answer that cost a coordinator 26 s to decode, 6 s to
    hash and 3 GB of memory before decoding was bounded.
    """
    from tests.test_network_nodes import http_answer

    entries = b",".join(
        b'"t%d":{"dtype":"F64","shape":[0],"data_offsets":[0,0]}' % i for i in range(count)
    )
    metadata = (
        b'{"aumai-fedtrain":"local-update/1","node_id":"node-2","round_id":"1",'
        b'"loss":"1.0","samples_used":"1"}'
    )
    header = b'{"__metadata__":' + metadata + b"," + entries + b"}"
    return http_answer(len(header).to_bytes(8, "little") + header)


def serve_empty_tensors(count: int) -> None:
    """Answer every request with :func:`empty_tensors_answer` until stdin closes.

    Prints ``host:port`` first. Run as its own process, so that the coordinator's memory is
    not measured with this one's (a child's peak includes its parent's memory at fork).
    """
    import sys
    import threading

    from tests.test_network_nodes import raw_node

    data = empty_tensors_answer(count)

    def answer(conn: socket.socket, request: bytes, stop: threading.Event) -> None:
        conn.sendall(data)

    with raw_node(answer) as (address, _):
        print(address, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    import sys

    serve_empty_tensors(int(sys.argv[1]))


IDLE_CONNECTIONS = 1000
FEW_FILES = 512


@contextmanager
def flood(node: LocalNode, timeout: float) -> Iterator[list[socket.socket]]:
    """Hold :data:`IDLE_CONNECTIONS` connections to ``node`` that never send a request.

    The node is first limited to :data:`FEW_FILES` open files (as on many machines), which so
    many idle connections used to exhaust. The connections are closed on exit.
    """
    assert node.process is not None, "start the node first"
    resource.prlimit(node.process.pid, resource.RLIMIT_NOFILE, (FEW_FILES, FEW_FILES))
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = socket.socket()
            idle.append(sock)
            sock.settimeout(timeout)
            sock.connect((node.host, node.port))
        yield idle
    finally:
        for sock in idle:
            sock.close()
