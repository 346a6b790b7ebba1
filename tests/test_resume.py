"""A run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run, and its
metrics file holds each round exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aumai_fedtrain.checkpoint import CheckpointError, load_checkpoint
from aumai_fedtrain.observability import METRICS_FILE, read_metrics

TIMEOUT = 300
CONFIG = {
    "model_name": "resume-test",
    "learning_rate": 0.002,
    "batch_size": 64,
    "local_steps": 60,
    "global_rounds": 8,
    "num_nodes": 6,
    "seed": 11,
}


def run_args(config: Path, checkpoint_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "aumai_fedtrain",
        "run",
        "--config",
        str(config),
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--json",
        *extra,
    ]


def completed_round(checkpoint_dir: Path) -> int:
    try:
        checkpoint = load_checkpoint(checkpoint_dir)
    except CheckpointError:  # pragma: no cover - replaced atomically, so never torn
        raise
    return checkpoint.state.round_id if checkpoint is not None else 0


def kill_after_round(args: list[str], checkpoint_dir: Path, rounds: int) -> int:
    """Start a run, SIGKILL it once ``rounds`` rounds are checkpointed; return that round."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while completed_round(checkpoint_dir) < rounds and process.poll() is None:
            assert time.monotonic() < deadline, "the run did not reach the round in time"
            time.sleep(0.005)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=TIMEOUT)
    return completed_round(checkpoint_dir)


@pytest.mark.parametrize("kill_at", [0, 3])
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, kill_at: int) -> None:
    # Prepare: an uninterrupted reference run
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = subprocess.run(
        run_args(config, reference_dir), capture_output=True, text=True, timeout=TIMEOUT, check=True
    )

    # Execute: kill a second run mid-way, then resume it
    reached = kill_after_round(run_args(config, killed_dir), killed_dir, kill_at)
    resumed = subprocess.run(
        run_args(config, killed_dir, "--resume"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )

    # Assert
    assert kill_at <= reached < CONFIG["global_rounds"]
    expected, actual = load_checkpoint(reference_dir), load_checkpoint(killed_dir)
    assert expected is not None and actual is not None
    assert actual.state.round_id == CONFIG["global_rounds"]
    for key, value in expected.state.parameters.items():
        assert actual.state.parameters[key].tobytes() == value.tobytes(), key
    assert actual.state == expected.state
    assert actual.credits == expected.credits
    reference_summary, resumed_summary = json.loads(reference.stdout), json.loads(resumed.stdout)
    for field in ("final_loss", "eval_loss", "eval_accuracy", "total_samples", "credits"):
        assert resumed_summary[field] == reference_summary[field], field
    expected_lines = read_metrics(reference_dir / METRICS_FILE)
    actual_lines = read_metrics(killed_dir / METRICS_FILE)
    assert [line.round_id for line in actual_lines] == list(range(1, CONFIG["global_rounds"] + 1))
    timing = {"duration_seconds", "node_times", "phase_seconds"}
    for actual_line, expected_line in zip(actual_lines, expected_lines, strict=True):
        assert actual_line.model_dump(exclude=timing) == expected_line.model_dump(exclude=timing)
        assert actual_line.node_times is not None
        assert sorted(actual_line.node_times.per_node) == sorted(expected_line.participants)
