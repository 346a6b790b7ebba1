"""metrics.jsonl: appended per round, reconciled with the checkpoint on resume, read while
written; the wire's size formula behind the simulation's byte counts; drop reason kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aumai_fedtrain import DiLoCoCoordinator, LocalUpdate, RoundRecord, TrainingConfig
from aumai_fedtrain.network.wire import (
    SAFETENSORS,
    TrainRequest,
    encode_request,
    encode_update,
    expected_tensors,
    request_body_bytes,
    update_body_bytes,
)
from aumai_fedtrain.observability import METRICS_FILE, MetricsFile, MetricsFileError, read_metrics
from aumai_fedtrain.observability.records import DROP_KINDS, drop_kind
from tests.helpers import QuadraticProvider, quadratic_nodes


def record(round_id: int, loss: float = 1.0) -> RoundRecord:
    return RoundRecord(
        round_id=round_id,
        avg_loss=loss,
        total_samples=10,
        num_participants=2,
        duration_seconds=0.5,
        phase_seconds={"collect": 0.25, "checkpoint": 0.125},
    )


def lines_of(path: Path) -> list[int]:
    return [line.round_id for line in read_metrics(path)]


def test_resume_drops_rounds_after_the_checkpoint_and_fills_missing_ones(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    # rounds 1 and 3 written, round 2's line lost, round 4 written after the last checkpoint (3),
    # and a torn line of round 5
    path.write_text(
        "".join(record(r).model_dump_json() + "\n" for r in (1, 3, 4)) + '{"round_id": 5, "av'
    )
    history = [record(r, loss=2.0) for r in (1, 2, 3)]  # the checkpoint's copies

    with MetricsFile(path, completed=3, history=history) as metrics:
        metrics.append(record(4, loss=4.0))

    found = read_metrics(path)
    assert [line.round_id for line in found] == [1, 2, 3, 4]
    assert [line.avg_loss for line in found] == [1.0, 2.0, 1.0, 4.0]  # the file's where it has one


def test_a_new_run_refuses_a_metrics_file_of_another_run(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text(record(1).model_dump_json() + "\n")

    with pytest.raises(MetricsFileError, match=r"already holds 1 rounds of another run"):
        MetricsFile(path)

    assert lines_of(path) == [1]


def test_two_runs_cannot_write_one_metrics_file(tmp_path: Path) -> None:
    with (
        MetricsFile(tmp_path / "m.jsonl"),
        pytest.raises(MetricsFileError, match="being written by another run"),
    ):
        MetricsFile(tmp_path / "m.jsonl")


def test_a_line_that_is_not_a_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(record(1).model_dump_json() + "\n" + '{"round_id": 0}\n')

    with pytest.raises(MetricsFileError, match=r"m.jsonl', line 2: not a round record"):
        read_metrics(path)


def test_run_training_writes_metrics_file_and_on_round_gets_the_same_records(
    tmp_path: Path,
) -> None:
    nodes, targets = quadratic_nodes()
    config = TrainingConfig(num_nodes=2, global_rounds=3, local_steps=3, learning_rate=0.1)
    seen: list[RoundRecord] = []

    result = DiLoCoCoordinator().run_training(
        config, nodes, QuadraticProvider(targets), metrics_file=tmp_path / "m.jsonl",
        on_round=seen.append,
    )  # fmt: skip

    assert read_metrics(tmp_path / "m.jsonl") == seen
    assert [r.round_id for r in seen] == [1, 2, 3]
    assert seen == result.history  # no checkpoint: nothing measured after the history
    for line in seen:
        assert set(line.phase_seconds) == {
            "collect",
            "verify",
            "aggregate",
            "outer_step",
            "evaluate",
        }
        assert line.participants == ["a", "b"] and line.num_nodes == 2
        assert line.bytes_to_nodes is None and line.node_times is None  # not reported


@pytest.mark.parametrize(
    "names",
    [["w"], ["b", "a", 'é"x\n', "big"], [], ["z" * 300, "\x01ctrl", "ü/ö"]],
)
@pytest.mark.parametrize("round_id", [0, 7, 123456789])
def test_the_body_size_formula_matches_the_encoded_bodies(names: list[str], round_id: int) -> None:
    shapes = [(3,), (2, 5), (0,), (40, 250)]
    weights = {name: np.ones(shapes[i % 4]) for i, name in enumerate(names)}
    update = LocalUpdate(
        node_id="nödé-1", round_id=round_id, gradients=weights, loss=0.1 / 3, samples_used=320
    )

    encoded = encode_request(TrainRequest(round_id=round_id, global_weights=weights), SAFETENSORS)
    assert request_body_bytes(round_id, expected_tensors(weights)) == len(encoded)
    assert update_body_bytes(update) == len(encode_update(update, SAFETENSORS))


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("benched after 3 failed rounds: no answer within 5 s", "benched"),
        ("no answer within 120 s", "timeout"),
        ("cannot reach http://127.0.0.1:1/train: [Errno 111] Connection refused", "unreachable"),
        ("HTTP 503: busy", "http_error"),
        ("bad signature: tampered with, or signed with another key", "signature"),
        ("unsigned update (no x-fedtrain-signature header)", "signature"),
        ("replayed or stale update for round 1, expected round 2", "signature"),
        ("answer of 999 bytes exceeds the limit of 10 bytes", "bad_answer"),
        ("malformed answer: invalid update", "bad_answer"),
        ("does not match the model: missing keys ['w'], unknown keys []", "model_mismatch"),
        ("gradient 'w' has shape (2,), the model's is (3,)", "model_mismatch"),
        ("non-finite loss nan: the node's local training diverged", "diverged"),
        ("the trainer returned an invalid result (expected ...)", "trainer"),
        ("gradient 'w' has non-finite values", "screening"),
        ("gradient 'w' has values beyond max_abs_update=10000 (up to 1e+05)", "screening"),
        ("loss 1e+12 is beyond max_loss=1e+09", "screening"),
        ("claims 1000 samples, more than the 320 it may process in a round", "screening"),
        ("sent 2 updates for one round", "screening"),
        ("something new", "other"),
    ],
)
def test_drop_reasons_sort_into_bounded_kinds(reason: str, kind: str) -> None:
    assert drop_kind(reason) == kind
    assert kind in DROP_KINDS
