"""Pattern 4: checkpoint the global state as JSON (after a real 5-round simulated run).

For resumable runs prefer ``run_training(..., checkpoint_dir=...)`` or
``aumai-fedtrain run --checkpoint-dir``: they also keep credits and history, atomically.
"""

import json

from aumai_fedtrain import DiLoCoCoordinator, TrainingConfig
from aumai_fedtrain.models import GlobalState
from aumai_fedtrain.simulation import SimulationProvider, simulated_nodes

config = TrainingConfig(global_rounds=5, num_nodes=3)
state = (
    DiLoCoCoordinator()
    .run_training(config, simulated_nodes(config.num_nodes), SimulationProvider())
    .final_state
)

# After each round, checkpoint the state
state_json = json.dumps(state.model_dump(mode="json"), indent=2)
with open(f"checkpoint_round_{state.round_id}.json", "w") as f:
    f.write(state_json)

# Reload from checkpoint
with open("checkpoint_round_5.json") as f:
    restored_state = GlobalState.model_validate_json(f.read())
print(f"Restored from round {restored_state.round_id}")
assert restored_state == state
