"""Pattern 2: verify updates in a pipeline."""

from aumai_fedtrain import HashVerifier, LocalUpdate

verifier = HashVerifier()

# On the sending node: compute and attach the hash
update = LocalUpdate(
    node_id="node-0",
    round_id=3,
    gradients={"w": [0.01, -0.02, 0.005], "b": [0.001]},
    loss=0.321,
    samples_used=200,
)
hash_digest = verifier.compute_hash(update.gradients)

# On the receiving coordinator: verify before aggregating
if not verifier.verify(update, hash_digest):
    raise ValueError(f"Gradient tampering detected from {update.node_id}")
print(f"Update from {update.node_id} verified: {hash_digest}")
