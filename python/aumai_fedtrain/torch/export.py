"""The global model of a checkpoint in a PyTorch model: :func:`load_global_model`,
:func:`export_model`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from aumai_fedtrain.export import export_metadata, global_model
from aumai_fedtrain.files import write_atomically
from aumai_fedtrain.torch.convert import load_tensormap, tensormap_to_state_dict
from aumai_fedtrain.torch.trainer import ModelFactory, build_model

__all__ = ["export_model", "load_global_model"]


def load_global_model(checkpoint_dir: str | Path, model: nn.Module) -> nn.Module:
    """Copy the checkpoint's global model into ``model`` (in place) and return ``model``.

    Raises :class:`~aumai_fedtrain.checkpoint.CheckpointError` when the checkpoint holds no
    model, ``ValueError`` when its tensors are not ``model``'s (names or shapes).
    """
    parameters, _ = global_model(checkpoint_dir)
    load_tensormap(model, parameters)
    return model


def export_model(
    checkpoint_dir: str | Path, out: str | Path, model: nn.Module | ModelFactory
) -> dict[str, torch.Tensor]:
    """Write the checkpoint's global model to ``out`` in ``model``'s dtypes; return it.

    ``model`` is an ``nn.Module`` or a model factory, ``model(config)``, built with the
    checkpoint's config (see :func:`~aumai_fedtrain.torch.build_model`). Every entry of its
    ``state_dict()`` is written (buffers included) in that entry's dtype (integer buffers
    rounded to the nearest integer), on the CPU, so that
    ``model.load_state_dict(safetensors.torch.load_file(out))`` works. ``model`` itself is not
    changed. Raises like :func:`load_global_model`, and ``OSError`` when ``out`` cannot be
    written.
    """
    parameters, checkpoint = global_model(checkpoint_dir)
    if not isinstance(model, nn.Module):
        model = build_model(model, checkpoint.config)
    like = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    state = {
        name: tensor.contiguous()
        for name, tensor in tensormap_to_state_dict(parameters, like).items()
    }
    metadata = export_metadata(checkpoint)
    write_atomically(out, save(state, metadata=metadata))
    return state
