"""DiLoCo for a PyTorch model, in one process: four nodes, each with data of its own.

The model is any ``nn.Module`` (here a small MLP); :func:`aumai_fedtrain.torch.trainer_factory`
turns it, a loss function and each node's data into the nodes' trainers, and
:func:`~aumai_fedtrain.torch.model_init` gives the coordinator the same initial model. Every
node takes ``local_steps`` AdamW steps on its own batches per round, keeps its AdamW state
across rounds, and sends the pseudo-gradient; the coordinator averages the four and takes the
outer Nesterov step. The data is two interleaved spirals; each node sees only one quarter of the
plane (non-i.i.d.), the held-out set covers all of it. At the end the global model is exported
from the checkpoint and loaded back with ``load_state_dict``.

    python examples/torch_diloco.py
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from aumai_fedtrain import DiLoCoCoordinator, RoundRecord, TrainingConfig
from aumai_fedtrain.models import TensorMap
from aumai_fedtrain.providers import InProcessProvider
from aumai_fedtrain.simulation import simulated_nodes
from aumai_fedtrain.torch import export_model, load_tensormap, model_init, trainer_factory

NODES = 4


def spirals(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` points of two interleaved spirals (label 0 or 1), with a little noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=generator)
    radius = torch.rand(count, generator=generator) * 3.0 + 0.3
    angle = 2.0 * radius + math.pi * labels
    points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    return points + 0.05 * torch.randn(count, 2, generator=generator), labels


def make_model(config: TrainingConfig) -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, 64),
        nn.LayerNorm(64),
        nn.GELU(),
        nn.Linear(64, 64),
        nn.GELU(),
        nn.Linear(64, 2),
    )


def node_data(node_id: str, config: TrainingConfig) -> DataLoader[tuple[torch.Tensor, ...]]:
    """The node's quarter of the plane, shuffled by a generator of its own (exact resume)."""
    index = int(node_id.rsplit("-", 1)[1])
    points, labels = spirals(20_000, seed=config.seed)
    quarter = (torch.atan2(points[:, 1], points[:, 0]) + math.pi) // (math.pi / 2) == index
    generator = torch.Generator().manual_seed(config.seed * 100 + index)
    dataset = TensorDataset(points[quarter], labels[quarter])
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    points, labels = batch
    return functional.cross_entropy(model(points), labels)


HELD_OUT = spirals(4_000, seed=12345)


def evaluate(parameters: TensorMap) -> tuple[float, float]:
    """Loss and accuracy of the global model on held-out points from the whole plane."""
    model = make_model(CONFIG)
    load_tensormap(model, parameters)
    return accuracy(model)


def accuracy(model: nn.Module) -> tuple[float, float]:
    points, labels = HELD_OUT
    with torch.no_grad():
        logits = model(points)
    hits = (logits.argmax(dim=1) == labels).float().mean()
    return float(functional.cross_entropy(logits, labels)), float(hits)


CONFIG = TrainingConfig(
    model_name="spirals-mlp",
    learning_rate=0.003,
    batch_size=64,
    local_steps=50,
    global_rounds=12,
    num_nodes=NODES,
)


def main() -> None:
    torch.set_num_threads(1)  # a small model: one thread is fastest on a shared machine
    provider = InProcessProvider(
        trainer_factory(make_model, loss, node_data),
        model_init=model_init(make_model),
        evaluator=evaluate,
    )

    def show(record: RoundRecord) -> None:
        print(
            f"round {record.round_id:2d}: train loss {record.avg_loss:.4f}  held-out loss "
            f"{record.eval_loss:.4f}  accuracy {record.eval_accuracy:.1%}"
        )

    with tempfile.TemporaryDirectory() as folder:
        checkpoints = Path(folder) / "run"
        result = DiLoCoCoordinator().run_training(
            CONFIG, simulated_nodes(NODES), provider, checkpoint_dir=checkpoints, on_round=show
        )
        out = Path(folder) / "model.safetensors"
        export_model(checkpoints, out, make_model)
        model = make_model(CONFIG)
        model.load_state_dict(load_file(str(out)))
    held_out_loss, hits = accuracy(model)
    print(f"exported and loaded back: held-out loss {held_out_loss:.4f}, accuracy {hits:.1%}")
    print(f"samples per node: {result.credits}")


if __name__ == "__main__":
    main()
