"""One writer per checkpoint directory: a second run is refused at once, a dead one never blocks."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import aumai_fedtrain.checkpoint as checkpoint_module
from aumai_fedtrain import CheckpointError, TrainingConfig
from aumai_fedtrain.checkpoint import (
    CHECKPOINT_FILE,
    LOCK_FILE,
    Checkpoint,
    checkpoint_lock,
    load_checkpoint,
    save_checkpoint,
)
from aumai_fedtrain.coordinator import DiLoCoCoordinator
from aumai_fedtrain.models import FederatedNode

TIMEOUT = 120
HOLD = """
import sys
from aumai_fedtrain.checkpoint import checkpoint_lock
with checkpoint_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""
TRY = """
import sys
from aumai_fedtrain.checkpoint import CheckpointError, checkpoint_lock
try:
    with checkpoint_lock(sys.argv[1]):
        print("locked", flush=True)
except CheckpointError as exc:
    sys.exit(str(exc))
"""


def start_holder(directory: Path) -> subprocess.Popen[str]:
    """A process that holds the lock of ``directory`` until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "locked\n"
    return holder


def small_checkpoint() -> Checkpoint:
    config = TrainingConfig(num_nodes=1)
    node = FederatedNode(node_id="a")
    state = DiLoCoCoordinator().initialize(config, [node])
    return Checkpoint(
        config=config, node_ids=["a"], state=state, credits={}, history=[], elapsed=0.0
    )


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        # The holder keeps the lock until we close its stdin, after this returns: a second
        # process that waited for the lock would never return (and time out here).
        second = subprocess.run(
            [sys.executable, "-c", TRY, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=TIMEOUT)

    assert second.returncode == 1
    assert second.stdout == ""
    assert second.stderr == (
        f"checkpoint directory {str(tmp_path)!r} is in use by another run (pid {holder.pid}): "
        "wait for it to finish or choose another --checkpoint-dir\n"
    )
    assert holder.returncode == 0
    assert list(tmp_path.iterdir()) == []  # a finished run removes its lock file


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=TIMEOUT)
    assert holder.returncode == -signal.SIGKILL
    assert (tmp_path / LOCK_FILE).read_text() == f"{holder.pid}\n"  # left behind

    with checkpoint_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"

    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with checkpoint_lock(tmp_path):
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"), checkpoint_lock(tmp_path):
            pass  # pragma: no cover - the lock is held
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the refusal left it

    with checkpoint_lock(tmp_path):  # released: free again
        pass


def test_a_lock_file_removed_while_it_is_being_locked_is_not_the_one_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def flock_after_removal(fd: int, operation: int) -> None:
        if not calls:  # the previous holder removes the file between our open and our flock
            (tmp_path / LOCK_FILE).unlink()
        calls.append(fd)
        fcntl.flock(fd, operation)

    patched = SimpleNamespace(
        flock=flock_after_removal, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB
    )
    monkeypatch.setattr(checkpoint_module, "fcntl", patched)

    with checkpoint_lock(tmp_path):
        assert len(calls) == 2
        other = os.open(tmp_path / LOCK_FILE, os.O_RDWR)  # what the next run would lock
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)


def test_the_lock_file_does_not_disturb_saving_or_loading(tmp_path: Path) -> None:
    checkpoint = small_checkpoint()

    with checkpoint_lock(tmp_path / "run"):
        assert load_checkpoint(tmp_path / "run") is None
        save_checkpoint(tmp_path / "run", checkpoint)
        save_checkpoint(tmp_path / "run", checkpoint)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE, CHECKPOINT_FILE]
        assert load_checkpoint(tmp_path / "run") == checkpoint

    assert [p.name for p in (tmp_path / "run").iterdir()] == [CHECKPOINT_FILE]


def test_a_lock_in_an_unusable_place_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    with (
        pytest.raises(CheckpointError, match="is not a directory") as info,
        checkpoint_lock(tmp_path / "file"),
    ):
        pass  # pragma: no cover - never locked

    assert "\n" not in str(info.value)
