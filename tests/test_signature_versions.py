"""Signatures of another version (a peer of another aumai-fedtrain version) are refused by name.

Version 1 is what aumai-fedtrain 0.2 sent: a bare hex HMAC over the canonical JSON digest. End
to end, a real provider asks a small server in a thread that answers that way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import threading

import pytest

from aumai_fedtrain import FederatedNode, LocalUpdate
from aumai_fedtrain.network import SAFETENSORS, HttpUpdateProvider, QuorumError
from aumai_fedtrain.network.auth import (
    SIGNATURE_VERSION,
    SignatureVersionError,
    sign_update,
    signature_version,
    verify_update,
)
from aumai_fedtrain.network.wire import encode_update
from tests.test_network_hardening import KEY, STATE, zero_update
from tests.test_network_nodes import REQUEST_TIMEOUT, ask_within_bound, http_answer, raw_node


def version_1_signature(update: LocalUpdate, nonce: str) -> str:
    """The signature aumai-fedtrain 0.2 sent for ``update``."""
    plain = {name: value.tolist() for name, value in update.gradients.items()}
    canonical = hashlib.sha256(json.dumps(plain, sort_keys=True).encode("utf-8")).hexdigest()
    fields = {
        "v": 1,
        "node_id": update.node_id,
        "round_id": update.round_id,
        "samples_used": update.samples_used,
        "loss": update.loss,
        "gradients_sha256": canonical,
        "nonce": nonce,
    }
    message = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hmac.new(KEY, message, hashlib.sha256).hexdigest()


def test_signatures_of_other_versions_are_refused_naming_both_versions() -> None:
    # Prepare
    update = zero_update("old", 1)
    old = version_1_signature(update, "00ff")

    # Execute / Assert
    assert signature_version(old) == 1
    assert signature_version(sign_update(KEY, update, "00ff")) == SIGNATURE_VERSION == 2
    assert (signature_version("v3=ab"), signature_version("x"), signature_version("v=")) == (
        3,
        None,
        None,
    )
    with pytest.raises(SignatureVersionError) as refused:
        verify_update(KEY, update, old, "00ff")
    message = str(refused.value)
    assert "signature version 1" in message and "signature version 2" in message
    assert "\n" not in message
    with pytest.raises(SignatureVersionError, match=r"version 3 .* version 2"):
        verify_update(KEY, update, "v3=" + old, "00ff")
    assert not verify_update(KEY, update, "v2=" + old, "00ff")


def old_node(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    found = re.search(rb"(?im)^x-fedtrain-nonce:\s*([0-9a-f]*)", head)
    update = zero_update("old", 1)
    signature = version_1_signature(update, found.group(1).decode() if found else "")
    conn.sendall(http_answer(encode_update(update, SAFETENSORS), x_fedtrain_signature=signature))


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
