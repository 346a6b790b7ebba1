"""AdamW, the inner optimizer of DiLoCo, with PyTorch's ``torch.optim.AdamW`` semantics.

One step with gradient ``g`` at step count ``t`` (starting at 1)::

    theta = theta * (1 - lr * weight_decay)            # decoupled weight decay
    m     = beta1 * m + (1 - beta1) * g
    v     = beta2 * v + (1 - beta2) * g**2
    theta = theta - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
"""

from __future__ import annotations

import math

import numpy as np

from aumai_fedtrain.models import TensorMap

__all__ = ["AdamW"]


class AdamW:
    """AdamW over a dict of float64 arrays, updated in place.

    Parameters
    ----------
    lr
        Learning rate.
    betas
        Decay rates of the first and second moment estimates.
    eps
        Added to the denominator for numerical stability.
    weight_decay
        Decoupled weight decay coefficient (PyTorch's default is 0.01).
    """

    def __init__(
        self,
        lr: float,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps < 0:
            raise ValueError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.steps = 0
        self._first: TensorMap = {}
        self._second: TensorMap = {}

    def step(self, params: TensorMap, grads: TensorMap) -> None:
        """Update every array of ``params`` in place with its gradient from ``grads``."""
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1.0 - beta1**self.steps)
        root_correction = math.sqrt(1.0 - beta2**self.steps)
        decay = 1.0 - self.lr * self.weight_decay
        for key, theta in params.items():
            grad = grads[key]
            if key not in self._first:
                self._first[key] = np.zeros_like(theta)
                self._second[key] = np.zeros_like(theta)
            first, second = self._first[key], self._second[key]
            first *= beta1
            first += (1.0 - beta1) * grad
            second *= beta2
            second += (1.0 - beta2) * grad * grad
            denom = np.sqrt(second)
            denom /= root_correction
            denom += self.eps
            theta *= decay
            theta -= step_size * first / denom

    def state_dict(self) -> TensorMap:
        """The step count and moment estimates as tensors (``steps``, ``m/<key>``, ``v/<key>``).

        The moments are the live arrays, not copies (a checkpoint of many nodes would otherwise
        hold them twice); the next :meth:`step` changes them in place.
        """
        state: TensorMap = {"steps": np.array([float(self.steps)])}
        for key in self._first:
            state[f"m/{key}"] = self._first[key]
            state[f"v/{key}"] = self._second[key]
        return state

    def load_state_dict(self, state: TensorMap) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.steps = int(state["steps"][0])
        self._first = {k[2:]: v.copy() for k, v in state.items() if k.startswith("m/")}
        self._second = {k[2:]: v.copy() for k, v in state.items() if k.startswith("v/")}
