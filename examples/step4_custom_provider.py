"""Getting started, Step 4: run programmatically with a custom UpdateProvider."""

import math
import random

from aumai_fedtrain import (
    DiLoCoCoordinator,
    FederatedNode,
    GlobalState,
    LocalUpdate,
    TrainingConfig,
    UpdateProvider,
)


class DecayingLossProvider(UpdateProvider):
    """Produces updates with exponentially decaying loss."""

    def get_updates(
        self,
        round_id: int,
        state: GlobalState,
        nodes: list[FederatedNode],
    ) -> list[LocalUpdate]:
        return [
            LocalUpdate(
                node_id=node.node_id,
                round_id=round_id,
                gradients={
                    "w": [random.gauss(0, 0.05 / round_id) for _ in range(8)],
                    "b": [random.gauss(0, 0.01 / round_id)],
                },
                loss=math.exp(-round_id * 0.3),
                samples_used=random.randint(100, 300),
            )
            for node in nodes
        ]


config = TrainingConfig(
    model_name="demo",
    learning_rate=0.001,
    batch_size=32,
    local_steps=10,
    global_rounds=8,
    num_nodes=4,
)

nodes = [
    FederatedNode(node_id=f"node-{i}", address=f"192.168.1.{i}:5000")
    for i in range(4)
]

coordinator = DiLoCoCoordinator()
result = coordinator.run_training(config, nodes, DecayingLossProvider())

print(f"Final loss:    {result.final_loss:.6f}")
print(f"Total samples: {result.total_samples}")
print(f"Duration:      {result.duration_seconds:.4f}s")
