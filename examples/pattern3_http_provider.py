"""Pattern 3 of the user guide: an HTTP provider, run against a real node.

The class below is the guide's code verbatim. The driver under it starts a real node
(``aumai-fedtrain node``, the built-in simulation on shard 0) on a free local port, runs the
first round of a run with the guide's provider, and stops the node.

The guide's provider is the minimal form of the protocol: it asks the nodes one after the other,
sends ``state.global_weights`` (empty in the first round, so the node starts from the initial
model) as JSON, and trusts what comes back. Its requests carry no signature by the node's key,
so the node runs with ``--allow-unsigned-requests`` (it warns that anyone who can reach it may
then make it train); a node started without that option answers 401. From the second round on, ``state.global_weights``
holds NumPy arrays, which ``httpx.post(json=...)`` cannot serialise (``TypeError: Object of type
ndarray is not JSON serializable``), and it is the averaged update rather than the model a node
should start from; so the driver runs the first round only. The library's own
``aumai_fedtrain.network.HttpUpdateProvider`` is what a run over a real network uses: it sends
the global parameters, asks all nodes in parallel over binary bodies, verifies every update's
signature and drops stragglers, retries and enforces a quorum (see docs/deployment.md).
"""

import secrets
import tempfile
from pathlib import Path

from aumai_fedtrain import DiLoCoCoordinator, TrainingConfig
from aumai_fedtrain.network import LocalNode

from aumai_fedtrain import UpdateProvider, LocalUpdate, GlobalState, FederatedNode


class HttpUpdateProvider(UpdateProvider):
    """Collects real gradient updates from live nodes over HTTP."""

    def get_updates(
        self,
        round_id: int,
        state: GlobalState,
        nodes: list[FederatedNode],
    ) -> list[LocalUpdate]:
        import httpx

        updates: list[LocalUpdate] = []
        for node in nodes:
            response = httpx.post(
                f"http://{node.address}/train",
                json={
                    "round_id": round_id,
                    "global_weights": state.global_weights,
                },
                timeout=60.0,
            )
            response.raise_for_status()
            updates.append(LocalUpdate.model_validate(response.json()))
        return updates


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        key_file = Path(folder) / "node-0.key"
        key_file.write_text(secrets.token_hex(32))
        key_file.chmod(0o600)  # a secret: readable by its owner only
        with LocalNode("node-0", key_file, ["--shard", "0", "--allow-unsigned-requests"]) as node:
            print(f"Node node-0 serving on {node.url}")
            nodes = [FederatedNode(node_id="node-0", address=node.address)]
            coordinator = DiLoCoCoordinator()
            state = coordinator.initialize(TrainingConfig(num_nodes=1), nodes)
            updates = HttpUpdateProvider().get_updates(state.round_id + 1, state, nodes)
            state = coordinator.run_round(state, updates)
    update = updates[0]
    print(f"Update from {update.node_id} for round {update.round_id}:")
    for key, value in update.gradients.items():
        print(f"  {key}: shape {value.shape}, mean |delta| {abs(value).mean():.3e}")
    print(f"  loss {update.loss:.6f}, {update.samples_used} samples")
    print(f"After round {state.round_id}: avg_loss={state.avg_loss:.6f}")
    print(f"Credits: {coordinator.credit_tracker.all_credits()}")


if __name__ == "__main__":
    main()
