"""A PyTorch model on real nodes: ``aumai-fedtrain node --trainer torch_node:make_trainer``.

Each lab runs a node on its own machine, with its private data in the ``.pt`` file named by
``$FEDTRAIN_DATA`` (a dict of ``features`` and ``labels`` tensors), and keeps its trainer's
state (AdamW moments, position in the data) in ``--state-dir``, so that a node restarted after
a crash goes on where it stopped::

    FEDTRAIN_DATA=lab-a.pt aumai-fedtrain node --port 8750 --node-id lab-a \\
        --key-file lab-a.key --config node.json --trainer torch_node:make_trainer \\
        --state-dir state-lab-a

The coordinator takes the same initial model and writes checkpoints; the global model comes
out with ``export``, ready for ``model.load_state_dict(safetensors.torch.load_file(...))``::

    aumai-fedtrain run --config run.json --nodes-file nodes.json \\
        --model-init torch_node:initial_model --checkpoint-dir run
    aumai-fedtrain export --checkpoint-dir run --out model.safetensors \\
        --model torch_node:make_model

Running this file does all of it on this machine with two labs, over HTTP.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from aumai_fedtrain import TrainingConfig
from aumai_fedtrain.torch import model_init, trainer_factory

DATA_ENV = "FEDTRAIN_DATA"
FEATURES, CLASSES = 10, 4


def make_model(config: TrainingConfig) -> nn.Module:
    """The model every lab trains: a small MLP classifier."""
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def lab_data(node_id: str, config: TrainingConfig) -> DataLoader[tuple[torch.Tensor, ...]]:
    """This lab's private examples (from ``$FEDTRAIN_DATA``), shuffled by its own generator."""
    path = os.environ.get(DATA_ENV)
    if not path:
        raise ValueError(f"set {DATA_ENV} to this node's .pt data file")
    data = torch.load(path, weights_only=True)
    dataset = TensorDataset(data["features"], data["labels"])
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    features, labels = batch
    return functional.cross_entropy(model(features), labels)


make_trainer = trainer_factory(make_model, loss, lab_data)
"""The factory that ``--trainer torch_node:make_trainer`` names."""
initial_model = model_init(make_model)
"""The coordinator's ``--model-init torch_node:initial_model``."""


def main() -> None:
    from aumai_fedtrain.network import LocalNode

    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(CLASSES, FEATURES, generator=generator) * 2.0
    node_config = TrainingConfig(learning_rate=0.01, batch_size=32, local_steps=20)
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as name, ExitStack() as stack:
        folder = Path(name)
        (folder / "node.json").write_text(node_config.model_dump_json())
        run_config = node_config.model_copy(update={"model_name": "labs-mlp", "global_rounds": 8})
        (folder / "run.json").write_text(run_config.model_dump_json())
        entries = []
        for index, lab in enumerate(["lab-a", "lab-b"]):
            # Each lab mostly sees two of the four classes (non-i.i.d.).
            labels = torch.randint(0, 2, (600,), generator=generator) + 2 * index
            features = centres[labels] + torch.randn(600, FEATURES, generator=generator)
            torch.save({"features": features, "labels": labels}, folder / f"{lab}.pt")
            key_file = folder / f"{lab}.key"
            key_file.write_text(secrets.token_hex(32))
            key_file.chmod(0o600)
            node = LocalNode(
                lab, key_file,
                ["--config", str(folder / "node.json"), "--trainer", "torch_node:make_trainer",
                 "--state-dir", str(folder / f"state-{lab}")],
                cwd=here, env={DATA_ENV: str(folder / f"{lab}.pt")},
            )  # fmt: skip
            stack.enter_context(node)
            entries.append({"node_id": lab, "address": node.address, "key_file": key_file.name})
        (folder / "nodes.json").write_text(json.dumps(entries))
        cli = [sys.executable, "-m", "aumai_fedtrain"]
        trained = subprocess.run(
            [*cli, "run", "--config", "run.json", "--nodes-file", "nodes.json", "--model-init",
             "torch_node:initial_model", "--checkpoint-dir", "run", "--json"],
            cwd=folder, env={**os.environ, "PYTHONPATH": str(here)}, check=True,
            capture_output=True, text=True,
        )  # fmt: skip
        for record in json.loads(trained.stdout)["history"]:
            print(f"round {record['round_id']}: train loss {record['avg_loss']:.4f}")
        exported = subprocess.run(
            [*cli, "export", "--checkpoint-dir", "run", "--out", "model.safetensors", "--model",
             "torch_node:make_model"],
            cwd=folder, env={**os.environ, "PYTHONPATH": str(here)}, check=True,
            capture_output=True, text=True,
        )  # fmt: skip
        print(exported.stdout.strip())
        model = make_model(run_config)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    labels = torch.arange(CLASSES).repeat(250)
    features = centres[labels] + torch.randn(len(labels), FEATURES, generator=generator)
    with torch.no_grad():
        hits = (model(features).argmax(dim=1) == labels).float().mean()
    print(f"accuracy of the exported model on all four classes: {float(hits):.1%}")


if __name__ == "__main__":
    main()
