"""Nodes on this machine: start ``aumai-fedtrain node`` processes and wait until they serve.

For trying a deployment out on one machine, examples and tests. :class:`LocalNode` runs the
node command in a child process on a free loopback port, waits (bounded) until ``GET /health``
answers, and stops the process on exit.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

__all__ = ["LocalNode", "free_port"]

_POLL_SECONDS = 0.1
_STOP_SECONDS = 10.0
_LOG_TAIL_CHARS = 2000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class LocalNode:
    """An ``aumai-fedtrain node`` child process on this machine.

    Parameters
    ----------
    node_id
        The node's id.
    key_file
        Its key file.
    args
        More options of the node command (``--shard``, ``--token-file``, ``--trainer``, ...).
    host
        Address to listen on.
    port
        Port to listen on; a free one by default.
    ca_file
        CA file to check the node's certificate with when it serves TLS (``--ssl-certfile``).
    cwd, env
        Working folder and environment of the process (default: this process's).
    startup_timeout
        Seconds to wait for ``GET /health`` to answer.
    """

    def __init__(
        self,
        node_id: str,
        key_file: str | Path,
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ca_file: str | Path | None = None,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.scheme = "https" if "--ssl-certfile" in args else "http"
        self._command = [
            sys.executable,
            "-m",
            "aumai_fedtrain",
            "node",
            "--host",
            host,
            "--port",
            str(self.port),
            "--node-id",
            node_id,
            "--key-file",
            str(key_file),
            *args,
        ]
        self._ca_file = ca_file
        self._cwd = cwd
        self._env = dict(env) if env is not None else None
        self._startup_timeout = startup_timeout
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``host:port``, as a nodes file lists it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The node's base URL."""
        return f"{self.scheme}://{self.address}"

    def start(self) -> LocalNode:
        """Start the process and wait until it answers ``GET /health`` (see :meth:`wait_ready`)."""
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> None:
        """Start the process without waiting (to start several nodes at once)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"node {self.node_id} is already running")
        self.stop()  # the output file of an earlier run
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open until stop()
        try:
            self.process = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self._cwd,
                env={**os.environ, **self._env} if self._env is not None else None,
            )
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Wait until the launched node answers ``GET /health``.

        Raises ``RuntimeError`` with the node's output when it exits or does not answer within
        ``startup_timeout``; the process is stopped then.
        """
        if self.process is None:
            raise RuntimeError(f"node {self.node_id} was not launched")
        verify = (
            ssl.create_default_context(cafile=str(self._ca_file))
            if self._ca_file is not None
            else True
        )
        deadline = time.monotonic() + self._startup_timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0, verify=verify).is_success:
                    return
            except httpx.TransportError:
                pass
            time.sleep(_POLL_SECONDS)
        code = self.process.poll()
        problem = (
            f"exited with code {code}"
            if code is not None
            else f"did not answer within {self._startup_timeout:g} s"
        )
        output = self.output()
        self.stop()
        raise RuntimeError(f"node {self.node_id} {problem}: {output}")

    def output(self, tail: int | None = _LOG_TAIL_CHARS) -> str:
        """The last ``tail`` characters of what the node printed so far (None: all of it)."""
        if self._log is None:
            return ""
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")
        return (text[-tail:] if tail is not None else text).strip()

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash or a power cut would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=_STOP_SECONDS)

    def stop(self) -> None:
        """Ask the process to shut down (SIGTERM), killing it when it does not in time.

        Its output is discarded then.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
