"""The global model of a run, out of its checkpoint, as a safetensors file.

``aumai-fedtrain export --checkpoint-dir DIR --out model.safetensors`` and
:func:`export_global_model` write every tensor of the checkpoint's global model (parameters and
buffers, under the names the run's ``model_init`` gave them) to a safetensors file, replaced
atomically, which any framework reads: ``safetensors.torch.load_file`` for
``model.load_state_dict``, ``safetensors.numpy.load_file`` for NumPy. Tensors keep the
checkpoint's dtype unless ``dtype`` casts them; :func:`aumai_fedtrain.torch.export_model` writes
them in a PyTorch model's own dtypes instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aumai_fedtrain.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from aumai_fedtrain.files import write_atomically
from aumai_fedtrain.models import TensorMap

__all__ = [
    "EXPORT_DTYPES",
    "FORMAT_NAME",
    "export_global_model",
    "export_metadata",
    "global_model",
]

FORMAT_NAME = "aumai-fedtrain/global-model"
EXPORT_DTYPES = ("float64", "float32", "float16")
"""The dtypes :func:`export_global_model` casts to."""


def global_model(checkpoint_dir: str | Path) -> tuple[TensorMap, Checkpoint]:
    """The global model of the checkpoint in ``checkpoint_dir``, and the checkpoint.

    Raises :class:`~aumai_fedtrain.checkpoint.CheckpointError` when there is no checkpoint, it
    cannot be read, or its run had no model (only averaged updates).
    """
    checkpoint = load_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise CheckpointError(f"no checkpoint in {str(checkpoint_dir)!r}")
    if checkpoint.state.parameters is None:
        raise CheckpointError(
            f"the checkpoint in {str(checkpoint_dir)!r} holds no global model (its run only "
            "averaged updates: it had no model_init)"
        )
    return checkpoint.state.parameters, checkpoint


def export_metadata(checkpoint: Checkpoint) -> dict[str, str]:
    """The safetensors metadata of an exported model: format, model name and round."""
    return {
        "format": FORMAT_NAME,
        "model_name": checkpoint.config.model_name,
        "round": str(checkpoint.state.round_id),
    }


def export_global_model(
    checkpoint_dir: str | Path, out: str | Path, *, dtype: str | None = None
) -> Checkpoint:
    """Write the checkpoint's global model to the safetensors file ``out``; return the checkpoint.

    ``dtype`` (one of :data:`EXPORT_DTYPES`) casts every tensor; by default they keep the
    checkpoint's dtype. Raises :class:`~aumai_fedtrain.checkpoint.CheckpointError` (see
    :func:`global_model`), ``ValueError`` for another ``dtype`` and ``OSError`` when ``out``
    cannot be written.
    """
    from safetensors.numpy import save

    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    parameters, checkpoint = global_model(checkpoint_dir)
    tensors = {
        name: np.asarray(value, dtype=dtype or value.dtype, order="C")
        for name, value in parameters.items()
    }
    metadata = export_metadata(checkpoint)
    write_atomically(out, save(tensors, metadata=metadata))
    return checkpoint
