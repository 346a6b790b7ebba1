"""A one-hidden-layer ReLU MLP with softmax cross-entropy and hand-written backpropagation.

Parameters live in a plain dict of float64 arrays laid out like PyTorch's ``nn.Linear``
(``weight`` is ``(out, in)``)::

    layer1.weight (hidden, features)   layer1.bias (hidden,)
    layer2.weight (classes, hidden)    layer2.bias (classes,)
"""

from __future__ import annotations

import numpy as np

from aumai_fedtrain.models import TensorMap

__all__ = ["evaluate", "init_parameters", "loss_and_grads", "pack", "parameter_shapes"]


def parameter_shapes(
    num_features: int, hidden_units: int, num_classes: int
) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter, by name."""
    return {
        "layer1.weight": (hidden_units, num_features),
        "layer1.bias": (hidden_units,),
        "layer2.weight": (num_classes, hidden_units),
        "layer2.bias": (num_classes,),
    }


def init_parameters(
    num_features: int, hidden_units: int, num_classes: int, rng: np.random.Generator
) -> TensorMap:
    """PyTorch's default ``nn.Linear`` init: weights and biases ~ U(-1/sqrt(fan_in), +)."""
    shapes = parameter_shapes(num_features, hidden_units, num_classes)
    fan_in = {"layer1": num_features, "layer2": hidden_units}
    return {
        key: rng.uniform(-1.0, 1.0, size=shape) / np.sqrt(fan_in[key.split(".")[0]])
        for key, shape in shapes.items()
    }


def _forward(params: TensorMap, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations and log-probabilities of every row."""
    hidden = features @ params["layer1.weight"].T
    hidden += params["layer1.bias"]
    np.maximum(hidden, 0.0, out=hidden)
    logits = hidden @ params["layer2.weight"].T
    logits += params["layer2.bias"]
    logits -= logits.max(axis=1, keepdims=True)
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return hidden, logits


def pack(params: TensorMap) -> tuple[np.ndarray, TensorMap]:
    """Copy ``params`` into one contiguous buffer; return it and per-key views into it.

    An optimizer stepping the buffer updates every parameter in a few NumPy calls, which is
    what makes small models fast. The layout follows the sorted keys, so it does not depend on
    the order of the dict (a checkpointed optimizer state stays aligned with the parameters).
    """
    keys = sorted(params)
    flat = np.concatenate([params[key].ravel() for key in keys])
    views: TensorMap = {}
    offset = 0
    for key in keys:
        value = params[key]
        views[key] = flat[offset : offset + value.size].reshape(value.shape)
        offset += value.size
    return flat, views


def loss_and_grads(
    params: TensorMap,
    features: np.ndarray,
    labels: np.ndarray,
    out: TensorMap | None = None,
) -> tuple[float, TensorMap]:
    """Mean cross-entropy of a batch and its gradient with respect to every parameter.

    With ``out`` (contiguous arrays shaped like ``params``, e.g. from :func:`pack`) the
    gradients are written there instead of into new arrays.
    """
    if out is None:
        out = {key: np.empty_like(value) for key, value in params.items()}
    rows = np.arange(len(labels))
    hidden, log_probs = _forward(params, features)
    loss = -float(log_probs[rows, labels].mean())
    d_logits = np.exp(log_probs)
    d_logits[rows, labels] -= 1.0
    d_logits /= len(labels)
    d_hidden = d_logits @ params["layer2.weight"]
    d_hidden *= hidden > 0.0
    np.matmul(d_hidden.T, features, out=out["layer1.weight"])
    d_hidden.sum(axis=0, out=out["layer1.bias"])
    np.matmul(d_logits.T, hidden, out=out["layer2.weight"])
    d_logits.sum(axis=0, out=out["layer2.bias"])
    return loss, out


def evaluate(params: TensorMap, features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model on ``(features, labels)``."""
    _, log_probs = _forward(params, features)
    loss = -float(log_probs[np.arange(len(labels)), labels].mean())
    accuracy = float((log_probs.argmax(axis=1) == labels).mean())
    return loss, accuracy
