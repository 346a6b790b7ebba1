"""Quickstart: train the built-in model with DiLoCo across simulated nodes, from Python."""

from aumai_fedtrain import DiLoCoCoordinator, TrainingConfig
from aumai_fedtrain.simulation import SimulationProvider, simulated_nodes

config = TrainingConfig(model_name="quickstart", global_rounds=5, num_nodes=4)
coordinator = DiLoCoCoordinator()
result = coordinator.run_training(config, simulated_nodes(config.num_nodes), SimulationProvider())

for record in result.history:
    print(
        f"round {record.round_id}: train loss {record.avg_loss:.4f}  "
        f"eval loss {record.eval_loss:.4f}  eval accuracy {record.eval_accuracy:.1%}"
    )
print(f"Total samples: {result.total_samples}  Duration: {result.duration_seconds:.2f}s")
for node_id, samples in sorted(coordinator.credit_tracker.all_credits().items()):
    print(f"  {node_id}: {samples} samples")
