"""HashVerifier, GradientAverager and CreditTracker as the guide uses them, on both backends."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from aumai_fedtrain import CreditTracker, GradientAverager, HashVerifier, LocalUpdate


def update(node: str, gradients: dict[str, object], samples: int = 10) -> LocalUpdate:
    return LocalUpdate(
        node_id=node, round_id=1, gradients=gradients, loss=0.5, samples_used=samples
    )


def test_compute_hash_is_json_dumps_sha256(backend_name: str) -> None:
    gradients = {"weight": [0.1, -0.2, 0.05, 0.03], "bias": [0.01]}
    expected = hashlib.sha256(json.dumps(gradients, sort_keys=True).encode()).hexdigest()

    digest = HashVerifier(backend_name).compute_hash(update("n", gradients).gradients)

    assert digest == expected


def test_verify_accepts_either_case_and_rejects_tampering(backend_name: str) -> None:
    verifier = HashVerifier(backend_name)
    original = update("n", {"w": [0.01, -0.02, 0.005], "b": [0.001]})
    digest = verifier.compute_hash(original.gradients)
    tampered = update("n", {"w": [0.01, -0.02, 0.0050001], "b": [0.001]})

    assert verifier.verify(original, digest)
    assert verifier.verify(original, digest.upper())
    assert not verifier.verify(tampered, digest)


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, "a" * 63, "a" * 65])
def test_verify_rejects_malformed_digests(bad: str) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        HashVerifier("python").verify(update("n", {"w": [1.0]}), bad)


def test_average_weights_by_samples(backend_name: str) -> None:
    updates = [update("a", {"w": [1.0, 2.0]}, samples=1), update("b", {"w": [4.0, 8.0]}, 3)]

    averaged = GradientAverager(backend=backend_name).average(updates)

    np.testing.assert_allclose(averaged["w"], [3.25, 6.5], rtol=1e-12)


def test_uniform_average_and_missing_keys(backend_name: str) -> None:
    updates = [
        update("a", {"w": [1.0, 2.0], "only_a": [5.0]}, samples=1),
        update("b", {"w": [3.0, 4.0], "empty": []}, samples=100),
    ]

    averaged = GradientAverager("uniform", backend=backend_name).average(updates)

    np.testing.assert_allclose(averaged["w"], [2.0, 3.0], rtol=1e-12)
    np.testing.assert_allclose(averaged["only_a"], [5.0], rtol=1e-12)
    assert averaged["empty"].size == 0


def test_average_of_nothing_is_the_guides_error(backend_name: str) -> None:
    with pytest.raises(ValueError, match=r"^Cannot average an empty list of updates\.$"):
        GradientAverager(backend=backend_name).average([])


def test_average_names_the_key_and_nodes_of_a_shape_mismatch(backend_name: str) -> None:
    updates = [update("alpha", {"w": [1.0, 2.0]}), update("beta", {"w": [1.0, 2.0, 3.0]})]

    with pytest.raises(ValueError, match=r"'w'.*(alpha|beta)"):
        GradientAverager(backend=backend_name).average(updates)


def test_all_zero_sample_weights_are_an_error(backend_name: str) -> None:
    updates = [update("a", {"w": [1.0]}, samples=0), update("b", {"w": [2.0]}, samples=0)]

    with pytest.raises(ValueError, match="'w'"):
        GradientAverager(backend=backend_name).average(updates)


def test_unknown_weighting_is_rejected() -> None:
    with pytest.raises(ValueError, match="weighting"):
        GradientAverager("median")  # type: ignore[arg-type]


def test_credit_tracker_accumulates_per_node() -> None:
    tracker = CreditTracker()

    tracker.record("a", 10)
    tracker.record("a", 5)
    tracker.record("b", 7)

    assert tracker.get_credits("a") == 15
    assert tracker.get_credits("never-seen") == 0
    assert tracker.all_credits() == {"a": 15, "b": 7}
    assert tracker.total() == 22
    tracker.all_credits()["a"] = 0  # a copy: the tracker is unchanged
    assert tracker.get_credits("a") == 15
    with pytest.raises(ValueError, match="negative"):
        tracker.record("a", -1)


def test_sample_counts_whose_total_overflows_are_an_error(backend_name: str) -> None:
    updates = [update("a", {"w": [1.0]}, samples=10**308), update("b", {"w": [2.0]}, 10**308)]

    with pytest.raises(ValueError, match="overflows"):
        GradientAverager(backend=backend_name).average(updates)
