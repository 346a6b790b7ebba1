"""The outer optimizer of DiLoCo: SGD with (Nesterov) momentum on the averaged pseudo-gradient.

With ``lr=1`` and ``momentum=0`` the step reduces to plain averaging of the nodes' models
(FedAvg). The update rule matches ``torch.optim.SGD(nesterov=True, dampening=0)``::

    buf   = momentum * buf + delta
    step  = delta + momentum * buf   if nesterov else buf
    theta = theta - lr * step

The global model and its momentum are held in the model's dtype (:func:`outer_dtype`): a
float64 model's in float64, a float32 model's in float32, and a 16-bit model's in float32,
never float64 (16 bits would lose small outer steps to rounding); the averaged
pseudo-gradient is cast to that dtype before the step, which is computed in it.
"""

from __future__ import annotations

import numpy as np

from aumai_fedtrain.models import TensorMap


def outer_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a model of ``dtype`` keeps its outer state in: float32 for 16-bit floats, else
    the dtype itself."""
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def outer_step(
    parameters: TensorMap,
    momentum: TensorMap,
    delta: TensorMap,
    *,
    lr: float,
    momentum_factor: float,
    nesterov: bool,
) -> tuple[TensorMap, TensorMap]:
    """Apply one outer step and return ``(new_parameters, new_momentum)``.

    ``delta`` is the averaged pseudo-gradient ``theta_global - theta_node``, cast to each
    parameter's dtype; the results keep the parameters' dtypes. Inputs are not modified.
    Every key of ``parameters`` must be in ``delta`` and ``momentum`` with the same shape
    (start from :func:`zero_momentum`).
    """
    new_parameters: TensorMap = {}
    new_momentum: TensorMap = {}
    for key, theta in parameters.items():
        grad = delta[key].astype(theta.dtype, copy=False)
        buf = momentum_factor * momentum[key] + grad
        step = grad + momentum_factor * buf if nesterov else buf
        new_parameters[key] = theta - lr * step
        new_momentum[key] = buf
    return new_parameters, new_momentum


def zero_momentum(parameters: TensorMap) -> TensorMap:
    """A zero momentum buffer shaped like ``parameters``."""
    return {key: np.zeros_like(value) for key, value in parameters.items()}
