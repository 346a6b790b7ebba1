"""A float32 model for whole runs (``run --trainer tests.float32_trainers:make_trainer
--model-init tests.float32_trainers:initial_model``): nodes that take heavy-ball steps on a
least-squares problem of their own, in float32, keeping their velocity (float32) across rounds.
"""

from __future__ import annotations

import numpy as np

from aumai_fedtrain.models import TensorMap, TrainingConfig

PARAMETERS = 400_000


def initial_model(config: TrainingConfig) -> TensorMap:
    rng = np.random.default_rng(config.seed)
    return {
        "w": rng.standard_normal(PARAMETERS - 10).astype(np.float32),
        "b": np.zeros(10, dtype=np.float32),
    }


class HeavyBall:
    """Steps ``v = 0.9 v + (theta - target)``, ``theta -= lr * v`` in float32; ``v`` is kept."""

    def __init__(self, node_id: str, config: TrainingConfig) -> None:
        self.config = config
        seed = int(node_id.rsplit("-", 1)[-1]) + 1000 * config.seed
        shapes = {key: value.shape for key, value in initial_model(config).items()}
        rng = np.random.default_rng(seed)
        self.target = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        self.velocity = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}

    def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
        start = parameters or initial_model(self.config)
        delta, loss = {}, 0.0
        for key, theta in start.items():
            local = theta.astype(np.float32)  # a copy
            for _ in range(self.config.local_steps):
                gap = local - self.target[key]
                self.velocity[key] = np.float32(0.9) * self.velocity[key] + gap
                local -= np.float32(self.config.learning_rate) * self.velocity[key]
            loss += 0.5 * float(np.dot(gap, gap)) / PARAMETERS
            delta[key] = theta - local
        return delta, loss, self.config.local_steps * self.config.batch_size

    def state_dict(self) -> TensorMap:
        return dict(self.velocity)

    def load_state_dict(self, state: TensorMap) -> None:
        if not state:  # a fresh trainer's
            self.velocity = {k: np.zeros_like(v) for k, v in self.velocity.items()}
            return
        self.velocity = {k: np.array(state[k], dtype=np.float32) for k in self.velocity}


def make_trainer(node_id: str, config: TrainingConfig) -> HeavyBall:
    return HeavyBall(node_id, config)
