"""Pattern 1: run a single round manually."""

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, TrainingConfig, LocalUpdate

coordinator = DiLoCoCoordinator()

config = TrainingConfig(
    model_name="manual-run",
    learning_rate=0.01,
    batch_size=64,
    local_steps=5,
    global_rounds=10,
    num_nodes=2,
)
nodes = [
    FederatedNode(node_id="node-a", address="10.0.0.1:5000"),
    FederatedNode(node_id="node-b", address="10.0.0.2:5000"),
]

# Start
state = coordinator.initialize(config, nodes)
print(f"Initialised at round {state.round_id}")

# Simulate one round
updates = [
    LocalUpdate(node_id="node-a", round_id=1, gradients={"w": [0.1, 0.2]}, loss=0.5, samples_used=64),
    LocalUpdate(node_id="node-b", round_id=1, gradients={"w": [0.2, 0.1]}, loss=0.4, samples_used=64),
]
new_state = coordinator.run_round(state, updates)
print(f"After round {new_state.round_id}: avg_loss={new_state.avg_loss}")
print(f"Averaged weights: {new_state.global_weights}")
