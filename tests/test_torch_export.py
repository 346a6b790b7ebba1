"""The global model of a torch run goes back into the model: export and load_state_dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aumai_fedtrain import DiLoCoCoordinator, TrainingConfig
from aumai_fedtrain.checkpoint import load_checkpoint
from aumai_fedtrain.providers import InProcessProvider
from aumai_fedtrain.simulation import simulated_nodes
from aumai_fedtrain.torch import build_model, export_model, load_global_model
from tests import torch_models
from tests.helpers import run_cli
from tests.test_cli import assert_one_line_error

REPO = Path(__file__).resolve().parent.parent
CONFIG = TrainingConfig(
    model_name="torch-export", learning_rate=0.01, batch_size=16, local_steps=4,
    global_rounds=2, num_nodes=2, seed=8, outer_learning_rate=1.0, outer_momentum=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two rounds of two torch nodes that average their BatchNorm statistics, checkpointed."""
    directory = tmp_path_factory.mktemp("torch-run")
    provider = InProcessProvider(
        torch_models.make_averaging_trainer, model_init=torch_models.initial_model
    )
    DiLoCoCoordinator().run_training(CONFIG, simulated_nodes(2), provider, checkpoint_dir=directory)
    return directory


def test_the_exported_model_loads_with_load_state_dict(
    checkpoint_dir: Path, tmp_path: Path
) -> None:
    out, plain = tmp_path / "model.safetensors", tmp_path / "plain.safetensors"

    completed = run_cli(
        "export", "--checkpoint-dir", str(checkpoint_dir), "--out", str(out),
        "--model", "tests.torch_models:make_model", cwd=REPO,
    )  # fmt: skip
    as_stored = run_cli("export", "--checkpoint-dir", str(checkpoint_dir), "--out", str(plain))

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.rstrip().endswith(f"F32, I64) to {out}")
    model = build_model(torch_models.make_model, CONFIG)
    model.load_state_dict(load_file(str(out)))  # strict: every parameter and buffer
    reference = load_global_model(checkpoint_dir, torch_models.make_model(CONFIG))
    checkpoint = load_checkpoint(checkpoint_dir)
    assert checkpoint is not None and checkpoint.state.parameters is not None
    for name, tensor in reference.state_dict().items():
        assert model.state_dict()[name].dtype == tensor.dtype
        assert torch.equal(model.state_dict()[name], tensor), name
        held = torch.as_tensor(checkpoint.state.parameters[name])  # float32 (the counter float64)
        held = held.round() if name.endswith("tracked") else held
        assert torch.equal(tensor, held.to(tensor.dtype)), name
    counter = model.state_dict()["norm.num_batches_tracked"].item()
    assert counter == CONFIG.global_rounds * CONFIG.local_steps  # averaged, not kept local
    assert as_stored.returncode == 0, as_stored.stderr
    other = torch_models.make_model(CONFIG)
    other.load_state_dict(load_file(str(plain)))  # as stored: float32, the counter float64
    assert all(torch.equal(other.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_the_python_api_exports_in_the_models_own_dtype(
    checkpoint_dir: Path, tmp_path: Path
) -> None:
    half = torch_models.make_model(CONFIG).to(torch.bfloat16)

    state = export_model(checkpoint_dir, tmp_path / "bf16.safetensors", half)

    loaded = load_file(str(tmp_path / "bf16.safetensors"))
    assert loaded["hidden.weight"].dtype == torch.bfloat16
    assert loaded["norm.num_batches_tracked"].dtype == torch.int64
    half.load_state_dict(loaded)
    assert all(torch.equal(half.state_dict()[k], v) for k, v in state.items())
    wider = load_global_model(checkpoint_dir, torch_models.make_model(CONFIG))
    assert torch.equal(wider.hidden.weight.bfloat16(), half.hidden.weight)


def test_a_model_of_other_shapes_is_a_one_line_error(checkpoint_dir: Path) -> None:
    completed = run_cli(
        "export", "--checkpoint-dir", str(checkpoint_dir), "--out", "x.safetensors",
        "--model", "tests.test_torch_export:wider_model", cwd=REPO,
    )  # fmt: skip

    assert_one_line_error(completed, "--model tests.test_torch_export:wider_model", "shape")
    assert not (REPO / "x.safetensors").exists()


def wider_model(config: TrainingConfig) -> torch.nn.Module:
    model = torch_models.Net()
    model.out = torch.nn.Linear(16, torch_models.CLASSES + 1)
    return model
