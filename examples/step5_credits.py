"""Getting started, Step 5: inspect credit tracking after the Step 4 run."""

from step4_custom_provider import coordinator

credits = coordinator.credit_tracker.all_credits()
for node_id, samples in sorted(credits.items()):
    print(f"  {node_id}: {samples} samples")

# Query a single node
node_0_credits = coordinator.credit_tracker.get_credits("node-0")
print(f"node-0 contributed {node_0_credits} samples total")
