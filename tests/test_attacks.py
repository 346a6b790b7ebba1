"""Hostile nodes against a real run: two honest nodes and one hostile one, a quorum of two.

Every case runs the coordinator as the real CLI (``python -m aumai_fedtrain run --nodes-file
... --checkpoint-dir ... --json``) in a subprocess, for three rounds at a 5 s deadline, then
resumes its checkpoint for a fourth round. Each run must complete at quorum, within its
deadline (three rounds well under 30 s), with the coordinator's peak memory (its ``ru_maxrss``)
at most the honest run's plus the memory budget, plus 10%. Hostile trainers sign validly
(``--trainer tests.hostile_nodes:<factory>``); hostile servers run in threads of this process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aumai_fedtrain import LocalUpdate
from aumai_fedtrain.network import LocalNode
from aumai_fedtrain.network.auth import sign_update
from aumai_fedtrain.network.wire import JSON
from tests.helpers import CLI_TIMEOUT
from tests.hostile_nodes import flood
from tests.test_network_nodes import (
    COMMAND_TIMEOUT,
    REQUEST_TIMEOUT,
    Answer,
    Deployment,
    http_answer,
    raw_node,
    running,
)

REPOSITORY = Path(__file__).resolve().parents[1]
DEADLINE = 5
ROUNDS = 3
BUDGET_MIB = 64
HOSTILE = "node-2"
MiB = 1024 * 1024


@dataclass
class Run:
    """A finished coordinator process: exit code, output, wall time and peak memory."""

    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int

    def summary(self) -> dict[str, Any]:
        assert self.code == 0, self.stderr
        result: dict[str, Any] = json.loads(self.stdout)
        return result


def coordinate(*args: str, cwd: Path) -> Run:
    """Run ``python -m aumai_fedtrain ARGS``; its peak memory comes from ``wait4``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "aumai_fedtrain", *args], stdout=out, stderr=err, cwd=cwd
        )
        pid = status = 0
        usage: Any = None
        try:
            while not pid and time.monotonic() - started < CLI_TIMEOUT:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                time.sleep(0.05)
        finally:
            if not pid:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return Run(
            code=process.returncode,
            stdout=out.read().decode(),
            stderr=err.read().decode(),
            seconds=seconds,
            peak_bytes=usage.ru_maxrss * 1024,  # KiB on Linux
        )


def train_and_resume(
    deployment: Deployment, addresses: dict[str, str], folder: Path
) -> tuple[Run, Run]:
    """Three rounds against the nodes at ``addresses``, then a fourth one resumed."""
    folder.mkdir(exist_ok=True)
    nodes_file = folder / "nodes.json"
    nodes_file.write_text(json.dumps([
        {"node_id": node_id, "address": address, "key_file": str(deployment.key_files[node_id])}
        for node_id, address in addresses.items()
    ]))  # fmt: skip
    common = [
        "run", "--nodes-file", str(nodes_file), "--token-file", str(deployment.token_file),
        "--checkpoint-dir", str(folder / "checkpoints"), "--min-nodes", "2",
        "--timeout", str(DEADLINE), "--memory-budget-mb", str(BUDGET_MIB), "--json",
    ]  # fmt: skip
    first = coordinate(*common, "--rounds", str(ROUNDS), cwd=folder)
    resumed = coordinate(*common, "--rounds", str(ROUNDS + 1), "--resume", cwd=folder)
    return first, resumed


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment(tmp_path_factory.mktemp("attacks"), count=3)


@pytest.fixture(scope="module")
def honest(deployment: Deployment) -> Iterator[dict[str, str]]:
    """The two honest nodes of every run (node-0 and node-1), by id: their addresses."""
    with running([deployment.local_node(i) for i in range(2)]) as nodes:
        yield {node.node_id: node.address for node in nodes}


@pytest.fixture(scope="module")
def honest_peak(
    deployment: Deployment, honest: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> int:
    """The coordinator's peak memory in an all-honest run (and that run's checks)."""
    with running([deployment.local_node(2)]) as (third,):
        first, resumed = train_and_resume(
            deployment, {**honest, HOSTILE: third.address}, tmp_path_factory.mktemp("honest")
        )
    assert [r["num_participants"] for r in first.summary()["history"]] == [3] * ROUNDS
    assert resumed.summary()["rounds_completed"] == ROUNDS + 1
    return max(first.peak_bytes, resumed.peak_bytes)


def hostile_trainer(deployment: Deployment, factory: str) -> Callable[[], Any]:
    """A real node of ``HOSTILE`` serving ``tests.hostile_nodes:<factory>``."""

    @contextmanager
    def start() -> Iterator[str]:
        args = [
            "--trainer",
            f"tests.hostile_nodes:{factory}",
            "--token-file",
            str(deployment.token_file),
        ]
        with running([LocalNode(HOSTILE, deployment.key_files[HOSTILE], args, cwd=REPOSITORY)]) as (
            node,
        ):
            yield node.address

    return start


def hostile_server(answer: Answer) -> Callable[[], Any]:
    @contextmanager
    def start() -> Iterator[str]:
        with raw_node(answer) as (address, _):
            yield address

    return start


def request_round(request: bytes) -> int:
    """The round of a safetensors train request (from its metadata)."""
    body = request.partition(b"\r\n\r\n")[2]
    length = int.from_bytes(body[:8], "little")
    return int(json.loads(body[8 : 8 + length])["__metadata__"]["round_id"])


def json_samples_10_400(key: bytes) -> Answer:
    """Valid, signed JSON answers claiming 10**400 samples (more than any int64 on the wire)."""

    def answer(conn: socket.socket, request: bytes, stop: threading.Event) -> None:
        found = re.search(rb"(?im)^x-fedtrain-nonce:\s*([0-9a-f]*)", request)
        nonce = found.group(1).decode() if found else ""
        gradients = {
            "layer1.weight": np.zeros((256, 32)), "layer1.bias": np.zeros(256),
            "layer2.weight": np.zeros((10, 256)), "layer2.bias": np.zeros(10),
        }  # fmt: skip
        update = LocalUpdate(
            node_id=HOSTILE, round_id=request_round(request), gradients=gradients, loss=1.0,
            samples_used=10**400,
        )  # fmt: skip
        conn.sendall(
            http_answer(
                update.model_dump_json().encode(), JSON,
                x_fedtrain_signature=sign_update(key, update, nonce),
            )
        )  # fmt: skip

    return answer


@contextmanager
def empty_tensors() -> Iterator[str]:
    """A server (a process of its own) answering 1.6 million empty tensors (~95 MB)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.hostile_nodes", "1600000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPOSITORY, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        yield server.stdout.readline().strip()
    finally:
        server.communicate(timeout=COMMAND_TIMEOUT)  # closes its stdin: it stops


def busy_until_the_deadline(conn: socket.socket, request: bytes, stop: threading.Event) -> None:
    """Answers 503 (a reason to retry) just before the coordinator's deadline."""
    stop.wait(DEADLINE - 0.3)
    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")


@contextmanager
def silent_tls(stop_after: float = COMMAND_TIMEOUT) -> Iterator[str]:
    """A server that takes the connection and never answers the TLS ClientHello."""
    with raw_node(lambda conn, request, stop: stop.wait(stop_after)) as (address, _):
        yield f"https://{address}"


def flooded(deployment: Deployment) -> Callable[[], Any]:
    """An honest node of ``HOSTILE`` held by 1,000 idle connections, with few files allowed."""

    @contextmanager
    def start() -> Iterator[str]:
        with running([deployment.local_node(2)]) as (node,), flood(node, REQUEST_TIMEOUT):
            yield node.address

    return start


CASES: dict[str, tuple[Callable[[Deployment], Callable[[], Any]], str | None]] = {
    "huge loss": (lambda d: hostile_trainer(d, "huge_loss"), "loss 1e+308 is beyond max_loss"),
    "10**18 samples": (
        lambda d: hostile_trainer(d, "huge_samples"),
        "claims 1000000000000000000 samples, more than the 320",
    ),
    "10**400 samples in JSON": (
        lambda d: hostile_server(json_samples_10_400(d.keys()[HOSTILE])),
        "claims 1" + "0" * 400 + " samples, more than the 320",
    ),
    "1.7e308 gradients": (
        lambda d: hostile_trainer(d, "huge_gradients"),
        "has values beyond max_abs_update=10000",
    ),
    "1.6M empty tensors": (lambda d: empty_tensors, "answer of 94889016 bytes exceeds the limit"),
    "503 before the deadline": (
        lambda d: hostile_server(busy_until_the_deadline),
        "HTTP 503: busy (no time left to retry",
    ),
    "TLS handshake never completes": (lambda d: silent_tls, f"no answer within {DEADLINE} s"),
    "1,000 idle connections": (flooded, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_with_a_hostile_node_completes_at_quorum_within_its_deadline_and_memory(
    case: str, deployment: Deployment, honest: dict[str, str], honest_peak: int, tmp_path: Path
) -> None:
    make, reason = CASES[case]
    with make(deployment)() as address:
        first, resumed = train_and_resume(
            deployment, {**honest, HOSTILE: address}, tmp_path / "run"
        )

    summary = first.summary()
    assert summary["rounds_completed"] == ROUNDS
    assert first.seconds < 30  # three rounds at a 5 s deadline, start-up included
    for record in summary["history"]:
        if reason is None:
            assert record["num_participants"] == 3 and record["dropped"] == {}
        else:
            assert record["num_participants"] == 2
            assert record["dropped"].keys() == {HOSTILE}
            assert reason in record["dropped"][HOSTILE], record["dropped"]
    assert summary["credits"][HOSTILE] == (3 * 320 if reason is None else 0)
    assert resumed.summary()["rounds_completed"] == ROUNDS + 1
    allowed = (honest_peak + BUDGET_MIB * MiB) * 1.1
    assert max(first.peak_bytes, resumed.peak_bytes) <= allowed, (first.peak_bytes, honest_peak)
