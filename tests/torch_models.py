"""A small PyTorch model, data and trainer for the tests; node processes serve it too.

``aumai-fedtrain node --trainer tests.torch_models:make_trainer`` (from the repository root)
serves the same trainer as ``InProcessProvider(make_trainer, model_init=initial_model)``.
The model has a BatchNorm layer (float buffers and an integer counter) and dropout (random
inside a round), so that buffers and the seeding of each round are exercised.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from aumai_fedtrain.models import TensorMap, TrainingConfig
from aumai_fedtrain.torch import load_tensormap, model_init, trainer_factory

# One thread: faster for this small model on a machine shared with other processes, and the
# same arithmetic in the test process and in the node processes.
torch.set_num_threads(1)

FEATURES = 8
CLASSES = 3
SAMPLES_PER_NODE = 96


class Net(nn.Module):
    """8 -> 16 (BatchNorm, ReLU, dropout) -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.norm(self.hidden(x)))))


def make_model(config: TrainingConfig) -> nn.Module:
    return Net()


def _examples(seed: int, salt: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    digest = hashlib.sha256(f"{seed}/{salt}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    labels = rng.integers(0, CLASSES, size=count)
    centres = np.linspace(-1.0, 1.0, CLASSES * FEATURES).reshape(CLASSES, FEATURES)
    features = centres[labels] + rng.normal(scale=0.8, size=(count, FEATURES))
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def node_data(node_id: str, config: TrainingConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The node's own examples in batches of ``config.batch_size`` (a function of its id)."""
    features, labels = _examples(config.seed, node_id, SAMPLES_PER_NODE)
    size = config.batch_size
    return [
        (features[i : i + size], labels[i : i + size])
        for i in range(0, SAMPLES_PER_NODE - size + 1, size)
    ]


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    features, labels = batch
    return functional.cross_entropy(model(features), labels)


def evaluate(parameters: TensorMap, config: TrainingConfig) -> tuple[float, float]:
    """Loss and accuracy of the global model on held-out examples."""
    model = make_model(config)
    load_tensormap(model, parameters)
    model.eval()
    features, labels = _examples(config.seed, "held-out", 256)
    with torch.no_grad():
        logits = model(features)
    accuracy = (logits.argmax(dim=1) == labels).double().mean()
    return float(functional.cross_entropy(logits, labels)), float(accuracy)


make_trainer = trainer_factory(make_model, loss, node_data)
initial_model = model_init(make_model)
make_averaging_trainer = trainer_factory(make_model, loss, node_data, buffers="average")
