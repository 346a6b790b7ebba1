"""Updates that wait for an earlier node beyond the coordinator's allowance wait on disk
(``aumai_fedtrain.spool``), and the run is the same as when they wait in memory."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import aumai_fedtrain.cli as cli_module
import aumai_fedtrain.coordinator as coordinator_module
from aumai_fedtrain import DiLoCoCoordinator, LocalUpdate
from aumai_fedtrain import spool as spool_module
from aumai_fedtrain.cli import cli
from aumai_fedtrain.models import TrainingConfig, TrainingResult
from aumai_fedtrain.simulation import simulated_nodes
from aumai_fedtrain.spool import SpooledUpdate, SpoolError, UpdateSpool
from tests.test_streaming import NODES, SCRIPT, ScriptedProvider, assert_same_run

NAMES = [node.node_id for node in simulated_nodes(NODES)]


def train(
    provider: ScriptedProvider,
    backend: str = "native",
    rounds: int = 2,
    **coordinator: Any,
) -> TrainingResult:
    config = TrainingConfig(num_nodes=NODES, global_rounds=rounds, seed=3)
    return DiLoCoCoordinator(backend=backend, **coordinator).run_training(
        config, simulated_nodes(NODES), provider
    )


def spool_spied(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The node ids written to and read back from the spool, in order."""
    calls: dict[str, list[str]] = {"put": [], "take": []}
    put, take = UpdateSpool.put, UpdateSpool.take

    def spied_put(self: UpdateSpool, update: LocalUpdate) -> SpooledUpdate:
        calls["put"].append(update.node_id)
        return put(self, update)

    def spied_take(self: UpdateSpool, spooled: SpooledUpdate) -> LocalUpdate:
        calls["take"].append(spooled.node_id)
        return take(self, spooled)

    monkeypatch.setattr(UpdateSpool, "put", spied_put)
    monkeypatch.setattr(UpdateSpool, "take", spied_take)
    return calls


def one_update_bytes() -> int:
    """Bytes of the gradients of one simulated update (the built-in MLP)."""
    provider = ScriptedProvider(SCRIPT)
    config = TrainingConfig(num_nodes=NODES, seed=3)
    state = DiLoCoCoordinator().initialize(
        config, simulated_nodes(NODES), provider.initial_parameters(config)
    )
    provider.configure(config)
    update = provider.get_updates(1, state, simulated_nodes(NODES))[0]
    return sum(values.nbytes for values in update.gradients.values())


def test_updates_beyond_the_allowance_wait_on_disk_and_the_run_is_unchanged(
    monkeypatch: pytest.MonkeyPatch, backend_name: str, tmp_path: Path
) -> None:
    # Prepare
    in_memory = train(ScriptedProvider(SCRIPT), backend_name)
    calls = spool_spied(monkeypatch)
    provider = ScriptedProvider(SCRIPT)

    # Execute: no update may wait in memory.
    spilled = train(provider, backend_name, waiting_memory=0, spill_dir=tmp_path)

    # Assert: nodes 2 and 1 arrive before node 0 and wait on disk (their holds released at
    # once), are read back in node order, and the run is the in-memory one bit for bit.
    assert calls == {"put": [NAMES[2], NAMES[1]] * 2, "take": [NAMES[1], NAMES[2]] * 2}
    assert provider.released == [NAMES[i] for i in (2, 1, 0, 4)] * 2
    assert_same_run(spilled, in_memory)
    assert list(tmp_path.iterdir()) == []


def test_only_what_exceeds_the_allowance_goes_to_disk_the_last_in_node_order_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = spool_spied(monkeypatch)
    train(ScriptedProvider(SCRIPT), rounds=1, waiting_memory=one_update_bytes(), spill_dir=tmp_path)
    # Node 2 waits in memory within the allowance; when node 1 also waits, node 2 (later in
    # the node list, so folded later) goes to disk.
    assert calls == {"put": [NAMES[2]], "take": [NAMES[2]]}


def test_the_trips_to_disk_are_timed_in_the_aggregate_phase(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: a clock that moves only when an update goes to disk (1 s) or comes back (10 s).
    clock = [0.0]
    monkeypatch.setattr(coordinator_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    put, take = UpdateSpool.put, UpdateSpool.take

    def slow_put(self: UpdateSpool, update: LocalUpdate) -> SpooledUpdate:
        clock[0] += 1.0
        return put(self, update)

    def slow_take(self: UpdateSpool, spooled: SpooledUpdate) -> LocalUpdate:
        clock[0] += 10.0
        return take(self, spooled)

    monkeypatch.setattr(UpdateSpool, "put", slow_put)
    monkeypatch.setattr(UpdateSpool, "take", slow_take)

    # Execute: two updates of each round wait on disk.
    result = train(ScriptedProvider(SCRIPT), waiting_memory=0, spill_dir=tmp_path)

    # Assert
    for record in result.history:
        assert record.phase_seconds["aggregate"] == 2 * 1.0 + 2 * 10.0
        assert record.phase_seconds["collect"] == 0.0


def test_each_round_says_how_many_updates_waited_on_disk(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.INFO, logger="aumai_fedtrain"):
        train(ScriptedProvider(SCRIPT), waiting_memory=0, spill_dir=tmp_path)
    lines = [r.getMessage() for r in caplog.records if "waited on disk" in r.getMessage()]
    mib = 2 * one_update_bytes() / (1024 * 1024)
    assert lines == [
        f"round {r}: 2 updates waited on disk for an earlier node ({mib:.1f} MiB beyond "
        "waiting_memory)"
        for r in (1, 2)
    ]


def test_the_default_allowance_keeps_small_updates_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = spool_spied(monkeypatch)
    train(ScriptedProvider(SCRIPT), rounds=1)
    assert calls == {"put": [], "take": []}


def test_a_waiting_copy_changed_on_disk_drops_its_node_not_the_round(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # Prepare: the first byte of every update the spool writes is flipped on disk.
    put = UpdateSpool.put

    def tampered_put(self: UpdateSpool, update: LocalUpdate) -> SpooledUpdate:
        spooled = put(self, update)
        assert self._fd is not None
        first = os.pread(self._fd, 1, spooled.offset)
        os.pwrite(self._fd, bytes([first[0] ^ 1]), spooled.offset)
        return spooled

    monkeypatch.setattr(UpdateSpool, "put", tampered_put)

    # Execute
    with caplog.at_level(logging.WARNING, logger="aumai_fedtrain"):
        result = train(ScriptedProvider(SCRIPT), rounds=1, waiting_memory=0, spill_dir=tmp_path)

    # Assert: the round goes on without them, and the disk is named apart from the drops.
    record = result.history[0]
    assert record.participants == [NAMES[0], NAMES[4]]
    assert set(record.dropped) == {NAMES[1], NAMES[2], NAMES[3]}
    assert record.dropped[NAMES[2]] == "its waiting copy changed on disk"
    disk = [r.getMessage() for r in caplog.records if "read back from disk" in r.getMessage()]
    assert len(disk) == 2 and NAMES[1] in disk[0] and "check the disk" in disk[0]


def test_a_disk_that_refuses_keeps_waiting_updates_in_memory_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # Prepare
    in_memory = train(ScriptedProvider(SCRIPT))

    def full(self: UpdateSpool, update: LocalUpdate) -> SpooledUpdate:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(UpdateSpool, "put", full)

    # Execute
    with caplog.at_level(logging.WARNING, logger="aumai_fedtrain"):
        result = train(ScriptedProvider(SCRIPT), waiting_memory=0, spill_dir=tmp_path)

    # Assert: once per round, and nothing lost.
    warnings = [r.getMessage() for r in caplog.records if "could not move" in r.getMessage()]
    assert len(warnings) == 2
    assert "No space left on device" in warnings[0] and "--spill-dir" in warnings[0]
    assert_same_run(result, in_memory)


def test_a_second_update_of_a_node_waiting_on_disk_counts_neither(tmp_path: Path) -> None:
    provider = ScriptedProvider([2, 1, 2, ("silent", 3), 0, 4])
    result = train(provider, rounds=1, waiting_memory=0, spill_dir=tmp_path)
    assert result.history[0].participants == [NAMES[i] for i in (0, 1, 4)]
    assert result.history[0].dropped[NAMES[2]] == "sent 2 updates for one round"
    assert list(tmp_path.iterdir()) == []


def test_a_round_that_fails_closes_what_waits_on_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = spool_spied(monkeypatch)
    closed: list[UpdateSpool] = []
    close = UpdateSpool.close

    def spied_close(self: UpdateSpool) -> None:
        closed.append(self)
        close(self)

    monkeypatch.setattr(UpdateSpool, "close", spied_close)
    provider = ScriptedProvider([2, 1, None])
    with pytest.raises(TypeError, match="expected Arrivals"):
        train(provider, rounds=1, waiting_memory=0, spill_dir=tmp_path)
    assert calls["put"] == [NAMES[2], NAMES[1]]
    assert len(closed) == 1 and closed[0]._fd is None
    assert list(tmp_path.iterdir()) == []


def test_updates_wait_in_the_checkpoint_directory_by_default_in_a_file_no_one_sees(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Prepare: where the spool makes its file, and what the directory shows after each write.
    made_in: list[str | None] = []
    seen: list[list[str]] = []
    mkstemp, put = tempfile.mkstemp, UpdateSpool.put

    def recorded_mkstemp(**kwargs: Any) -> tuple[int, str]:
        made_in.append(kwargs.get("dir"))
        return mkstemp(**kwargs)

    def looked_put(self: UpdateSpool, update: LocalUpdate) -> SpooledUpdate:
        spooled = put(self, update)
        seen.append(sorted(path.name for path in tmp_path.iterdir()))
        return spooled

    monkeypatch.setattr(spool_module.tempfile, "mkstemp", recorded_mkstemp)
    monkeypatch.setattr(UpdateSpool, "put", looked_put)

    # Execute
    config = TrainingConfig(num_nodes=NODES, global_rounds=1, seed=3)
    DiLoCoCoordinator(waiting_memory=0).run_training(
        config, simulated_nodes(NODES), ScriptedProvider(SCRIPT), checkpoint_dir=tmp_path
    )

    # Assert: one file for the round, in the checkpoint directory, never visible there.
    assert made_in == [tmp_path]
    assert len(seen) == 2
    assert all(not [name for name in names if "waiting" in name] for names in seen)


def test_bad_spill_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="waiting_memory must be >= 0 bytes, got -1"):
        DiLoCoCoordinator(waiting_memory=-1)
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=r"spill_dir '.*missing' is not a writable directory"):
        train(ScriptedProvider(SCRIPT), rounds=1, spill_dir=missing)


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.linspace(-1, 1, 7, dtype=np.float32),
        np.array([np.nan, np.inf, -0.0, 65504.0], dtype=np.float16),
        np.array(2.5),
        np.zeros((0, 3), dtype=np.float32),
        np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2],  # not contiguous
    ],
)
def test_the_spool_gives_back_exactly_what_it_took(values: np.ndarray, tmp_path: Path) -> None:
    spool = UpdateSpool(tmp_path)
    update = LocalUpdate(
        node_id="n", round_id=1, gradients={"b": values, "a": -values}, loss=0.5, samples_used=3
    )
    spooled = spool.put(update)
    assert spooled.update.gradients == {}
    assert list(tmp_path.iterdir()) == []  # the file is unlinked at once
    back = spool.take(spooled)
    assert list(back.gradients) == ["b", "a"]
    for key, expected in update.gradients.items():
        assert back.gradients[key].dtype == expected.dtype
        assert back.gradients[key].shape == expected.shape
        assert back.gradients[key].tobytes() == expected.tobytes()
    assert back.model_dump(exclude={"gradients"}) == update.model_dump(exclude={"gradients"})
    spool.close()


def test_a_truncated_waiting_copy_or_a_closed_spool_is_a_spool_error(tmp_path: Path) -> None:
    spool = UpdateSpool(tmp_path)
    update = LocalUpdate(
        node_id="n", round_id=1, gradients={"w": np.ones(8)}, loss=1.0, samples_used=1
    )
    first, second = spool.put(update), spool.put(update)
    assert spool._fd is not None
    os.ftruncate(spool._fd, second.offset + 63)  # one byte short of the second
    assert spool.take(first).gradients["w"].tolist() == [1.0] * 8
    with pytest.raises(SpoolError, match=r"could not be read .*shorter"):
        spool.take(second)
    spool.close()
    with pytest.raises(SpoolError, match="the spool was closed"):
        spool.take(first)


def test_a_failed_write_leaves_the_spool_as_it_was(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spool = UpdateSpool(tmp_path)
    update = LocalUpdate(
        node_id="n", round_id=1, gradients={"w": np.arange(4.0)}, loss=1.0, samples_used=1
    )
    first = spool.put(update)
    write_buffers = spool_module.write_buffers

    def half_then_full(fd: int, buffers: list[memoryview]) -> None:
        write_buffers(fd, [buffers[0][:10]])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "write_buffers", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        spool.put(update)
    monkeypatch.setattr(spool_module, "write_buffers", write_buffers)
    third = spool.put(update)
    assert third.offset == first.offset + 32
    assert spool.take(third).gradients["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    spool.close()


def test_run_takes_the_waiting_memory_and_names_a_missing_spill_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made: list[dict[str, Any]] = []

    class Recorded(DiLoCoCoordinator):
        def __init__(self, **kwargs: Any) -> None:
            made.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(cli_module, "DiLoCoCoordinator", Recorded)
    runner = CliRunner()
    ok = runner.invoke(
        cli,
        ["run", "--nodes", "2", "--rounds", "1", "--waiting-memory-mb", "0",
         "--spill-dir", str(tmp_path), "--json"],
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert made == [{"waiting_memory": 0, "spill_dir": tmp_path}]
    missing = runner.invoke(cli, ["run", "--spill-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "--spill-dir" in missing.output and "does not exist" in missing.output
