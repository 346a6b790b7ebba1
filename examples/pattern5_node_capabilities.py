"""Pattern 5: add node capabilities metadata (visible to your UpdateProvider)."""

from aumai_fedtrain.models import FederatedNode

nodes = [
    FederatedNode(
        node_id="gpu-node-0",
        address="10.0.0.1:5000",
        capabilities={
            "gpu": True,
            "gpu_model": "A100",
            "ram_gb": 80,
            "network_mbps": 10000,
        },
        status="idle",
    ),
    FederatedNode(
        node_id="cpu-node-1",
        address="10.0.0.2:5000",
        capabilities={
            "gpu": False,
            "ram_gb": 32,
            "network_mbps": 1000,
        },
        status="idle",
    ),
]
for node in nodes:
    print(f"{node.node_id} ({node.status}): {node.capabilities}")
