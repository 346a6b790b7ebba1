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

import numpy as np
import pytest

from aumai_fedtrain.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from aumai_fedtrain.observability import METRICS_FILE, read_metrics

TIMEOUT = 300
REPO = Path(__file__).resolve().parent.parent
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


def reference_and_resumed(
    tmp_path: Path, config: str, extra: list[str], kill_at: int
) -> tuple[Checkpoint, Checkpoint, int, str]:
    """Run ``run --config <config text> <extra>`` from the repository root twice: once
    uninterrupted, and once SIGKILLed when ``kill_at`` rounds are checkpointed, then resumed.
    Returns both final checkpoints, the round the killed run had checkpointed, and the resumed
    run's output."""
    path = tmp_path / "config.json"
    path.write_text(config)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(
        [*run_args(path, reference_dir), *extra],
        cwd=REPO, capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    reached = kill_after_round([*run_args(path, killed_dir), *extra], killed_dir, kill_at)
    resumed = subprocess.run(
        [*run_args(path, killed_dir, "--resume"), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    expected, actual = load_checkpoint(reference_dir), load_checkpoint(killed_dir)
    assert expected is not None and actual is not None
    return expected, actual, reached, resumed.stdout


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


def test_a_float32_run_killed_with_sigkill_resumes_bit_identically(tmp_path: Path) -> None:
    # Prepare / Execute: a float32 model whose nodes keep float32 state, run without
    # interruption, and killed after round 2 then resumed
    float32_run = [
        "--trainer", "tests.float32_trainers:make_trainer",
        "--model-init", "tests.float32_trainers:initial_model",
    ]  # fmt: skip
    config = json.dumps({**CONFIG, "local_steps": 10, "num_nodes": 4})
    expected, actual, reached, _ = reference_and_resumed(tmp_path, config, float32_run, 2)

    # Assert: the same float32 model, momentum, last average and node state, bit for bit
    assert 2 <= reached < CONFIG["global_rounds"]
    assert actual.state.round_id == CONFIG["global_rounds"]
    pairs = [
        (actual.state.parameters, expected.state.parameters),
        (actual.state.momentum, expected.state.momentum),
        (actual.state.global_weights, expected.state.global_weights),
        (actual.provider_state, expected.provider_state),
    ]
    for held, wanted in pairs:
        assert held is not None and wanted is not None and sorted(held) == sorted(wanted)
        for key, value in wanted.items():
            assert held[key].dtype == value.dtype == np.float32, key
            assert held[key].tobytes() == value.tobytes(), key
    assert actual.state == expected.state and actual.credits == expected.credits
