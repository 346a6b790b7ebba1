"""PyTorch models in a DiLoCo run (the ``torch`` extra: ``pip install 'aumai-fedtrain[torch]'``).

- :mod:`~aumai_fedtrain.torch.convert`: a ``state_dict`` (or ``named_parameters()``) as a
  :data:`~aumai_fedtrain.models.TensorMap` and back, in each tensor's own dtype;
- :class:`TorchTrainer` and :func:`trainer_factory`: the DiLoCo node trainer for any
  ``nn.Module``, in process (:class:`~aumai_fedtrain.providers.InProcessProvider`) or on a real
  node (``aumai-fedtrain node --trainer module:factory``); :func:`model_init` gives the
  coordinator the same initial model;
- :func:`export_model` and :func:`load_global_model`: the global model of a checkpoint as a
  ``state_dict`` that ``model.load_state_dict`` takes.

The core package never imports this module: it runs without PyTorch. See ``docs/pytorch.md``.
"""

from __future__ import annotations

TORCH_EXTRA = "pip install 'aumai-fedtrain[torch]'"

try:
    import torch as _torch  # noqa: F401  (only to fail early, with the extra's name)
except ImportError as exc:
    raise ImportError(
        f"aumai_fedtrain.torch needs PyTorch, which is not installed: {TORCH_EXTRA}"
    ) from exc

from aumai_fedtrain.torch.convert import (  # noqa: E402
    load_tensormap,
    state_dict_to_tensormap,
    tensormap_to_state_dict,
    to_numpy,
)
from aumai_fedtrain.torch.export import export_model, load_global_model  # noqa: E402
from aumai_fedtrain.torch.trainer import (  # noqa: E402
    BufferPolicy,
    LossFunction,
    ModelFactory,
    OptimizerFactory,
    TorchTrainer,
    build_model,
    model_init,
    trainer_factory,
)

__all__ = [
    "TORCH_EXTRA",
    "BufferPolicy",
    "LossFunction",
    "ModelFactory",
    "OptimizerFactory",
    "TorchTrainer",
    "build_model",
    "export_model",
    "load_global_model",
    "load_tensormap",
    "model_init",
    "state_dict_to_tensormap",
    "tensormap_to_state_dict",
    "to_numpy",
    "trainer_factory",
]
