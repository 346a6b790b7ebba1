"""A node of the previous aumai-fedtrain version (signature version 1) is refused by name.

A real provider asks a small server in a thread that answers a valid update signed as
aumai-fedtrain 0.2 signed it: a bare hex HMAC over the canonical JSON digest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import threading

from aumai_fedtrain import FederatedNode
from aumai_fedtrain.network import SAFETENSORS, HttpUpdateProvider, QuorumError
from aumai_fedtrain.network.wire import encode_update
from tests.test_network_hardening import KEY, STATE, zero_update
from tests.test_network_nodes import REQUEST_TIMEOUT, ask_within_bound, http_answer, raw_node


def version_1_signature(head: bytes) -> tuple[bytes, str]:
    """The update body and the signature that aumai-fedtrain 0.2 would send for ``head``."""
    found = re.search(rb"(?im)^x-fedtrain-nonce:\s*([0-9a-f]*)", head)
    update = zero_update("old", 1)
    plain = {name: value.tolist() for name, value in update.gradients.items()}
    canonical = hashlib.sha256(json.dumps(plain, sort_keys=True).encode("utf-8")).hexdigest()
    fields = {
        "v": 1,
        "node_id": update.node_id,
        "round_id": update.round_id,
        "samples_used": update.samples_used,
        "loss": update.loss,
        "gradients_sha256": canonical,
        "nonce": found.group(1).decode() if found else "",
    }
    message = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return encode_update(update, SAFETENSORS), hmac.new(KEY, message, hashlib.sha256).hexdigest()


def old_node(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    body, signature = version_1_signature(head)
    conn.sendall(http_answer(body, x_fedtrain_signature=signature))


def test_a_node_signing_with_version_1_is_dropped_with_both_versions_named() -> None:
    # Prepare
    provider = HttpUpdateProvider({"old": KEY}, timeout=REQUEST_TIMEOUT, retries=0)

    # Execute
    with raw_node(old_node) as (address, _):
        error, _ = ask_within_bound(
            provider, [FederatedNode(node_id="old", address=address)], STATE
        )

    # Assert
    assert isinstance(error, QuorumError)
    reason = provider.failures[1]["old"]
    assert "signature version 1" in reason and "signature version 2" in reason, reason
    assert "\n" not in reason
