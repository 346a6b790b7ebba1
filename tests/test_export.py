"""``aumai-fedtrain export``: the global model of a checkpoint as a safetensors file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from aumai_fedtrain import DiLoCoCoordinator, TrainingConfig
from aumai_fedtrain.checkpoint import CheckpointError, load_checkpoint
from aumai_fedtrain.export import export_global_model
from aumai_fedtrain.providers import InProcessProvider
from aumai_fedtrain.simulation import simulated_nodes
from tests.helpers import CLI_TIMEOUT, function_trainer, run_cli
from tests.test_cli import assert_one_line_error

NO_TORCH = Path(__file__).resolve().parent / "no_torch"


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-round run of the built-in simulation, checkpointed."""
    directory = tmp_path_factory.mktemp("run")
    completed = run_cli("run", "--rounds", "2", "--checkpoint-dir", str(directory), "--json")
    assert completed.returncode == 0, completed.stderr
    return directory


def test_the_cli_writes_the_global_model_of_the_checkpoint(
    checkpoint_dir: Path, tmp_path: Path
) -> None:
    out, out32 = tmp_path / "model.safetensors", tmp_path / "model32.safetensors"

    completed = run_cli("export", "--checkpoint-dir", str(checkpoint_dir), "--out", str(out))
    as_float32 = run_cli(
        "export", "--checkpoint-dir", str(checkpoint_dir), "--out", str(out32), "--dtype", "float32"
    )

    checkpoint = load_checkpoint(checkpoint_dir)
    assert checkpoint is not None and checkpoint.state.parameters is not None
    parameters = checkpoint.state.parameters
    assert completed.returncode == 0, completed.stderr
    values = sum(value.size for value in parameters.values())
    assert completed.stdout.strip() == (
        f"Exported the global model after round 2 ({len(parameters)} tensors, {values:,} "
        f"values, F64) to {out}"
    )
    written = load_file(str(out))
    assert sorted(written) == sorted(parameters)
    assert all(written[k].tobytes() == parameters[k].tobytes() for k in parameters)
    with safe_open(str(out), framework="np") as handle:
        assert handle.metadata() == {
            "format": "aumai-fedtrain/global-model",
            "model_name": checkpoint.config.model_name,
            "round": "2",
        }
    assert as_float32.returncode == 0 and as_float32.stdout.rstrip().endswith(f"F32) to {out32}")
    narrow = load_file(str(out32))
    assert all(narrow[k].tobytes() == parameters[k].astype(np.float32).tobytes() for k in narrow)
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed


def test_a_run_without_a_model_has_nothing_to_export(tmp_path: Path) -> None:
    provider = InProcessProvider(function_trainer(lambda r, p, c: ({"w": [1.0]}, 0.5, 4)))
    config = TrainingConfig(global_rounds=1, num_nodes=1, batch_size=2, local_steps=2)
    DiLoCoCoordinator().run_training(
        config, simulated_nodes(1), provider, checkpoint_dir=tmp_path / "averages"
    )

    with pytest.raises(CheckpointError, match="holds no global model"):
        export_global_model(tmp_path / "averages", tmp_path / "out.safetensors")
    assert_one_line_error(
        run_cli("export", "--checkpoint-dir", str(tmp_path / "nothing"), "--out", "x"),
        "no checkpoint in",
    )
    with pytest.raises(ValueError, match="dtype must be one of float64, float32, float16"):
        export_global_model(tmp_path / "averages", tmp_path / "out", dtype="int8")


def test_bad_export_options_are_one_line_errors(checkpoint_dir: Path, tmp_path: Path) -> None:
    common = ["export", "--checkpoint-dir", str(checkpoint_dir)]
    unwritable = str(tmp_path / "missing-folder" / "model.safetensors")

    assert_one_line_error(run_cli(*common, "--out", unwritable), "cannot write", "missing-folder")
    assert_one_line_error(
        run_cli(*common, "--out", "m", "--dtype", "float32", "--model", "m:f"),
        "--dtype cannot go with --model",
    )
    assert_one_line_error(run_cli(*common, "--out", "m", "--model", "nomodule"), "module:function")
    without_torch = subprocess.run(
        [sys.executable, "-m", "aumai_fedtrain", *common, "--out", "m", "--model", "json:dumps"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(NO_TORCH)},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert_one_line_error(without_torch, "pip install 'aumai-fedtrain[torch]'")
    assert not (tmp_path / "m").exists()
