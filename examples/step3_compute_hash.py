"""Getting started, Step 3: compute the SHA-256 of an update's gradients.

Verify it with: aumai-fedtrain verify --update examples/update.json --hash <printed hash>
"""

from aumai_fedtrain import HashVerifier, LocalUpdate

update = LocalUpdate.model_validate({
    "node_id": "node-000",
    "round_id": 1,
    "gradients": {"weight": [0.1, -0.2, 0.05, 0.03], "bias": [0.01]},
    "loss": 0.852341,
    "samples_used": 128,
})
verifier = HashVerifier()
print(verifier.compute_hash(update.gradients))
