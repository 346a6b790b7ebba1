"""The aumai-fedtrain command line: real runs, hashing, verification and one-line errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from aumai_fedtrain import __version__
from tests.helpers import run_cli as cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def assert_one_line_error(completed: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert completed.returncode == 2, (completed.stdout, completed.stderr)
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), completed.stderr
    for needle in needles:
        assert needle in lines[0]


def write_update(path: Path, gradients: dict[str, list[float]]) -> Path:
    path.write_text(
        json.dumps(
            {
                "node_id": "node-000",
                "round_id": 1,
                "gradients": gradients,
                "loss": 0.85,
                "samples_used": 128,
            }
        )
    )
    return path


def test_version() -> None:
    completed = cli("--version")

    assert completed.returncode == 0
    assert completed.stdout.strip() == f"aumai-fedtrain, version {__version__}"


def test_run_with_the_guides_config_trains_for_real() -> None:
    completed = cli("run", "--config", str(EXAMPLES / "train.json"), "--nodes", "3", "--json")

    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    history = summary["history"]
    assert summary["rounds_completed"] == 5 and len(history) == 5
    assert history[-1]["avg_loss"] < history[0]["avg_loss"] / 2
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    assert summary["credits"] == {f"node-00{i}": 5 * 10 * 32 for i in range(3)}
    assert summary["total_samples"] == sum(summary["credits"].values())


def test_run_prints_the_guides_summary() -> None:
    completed = cli("run", "--config", str(EXAMPLES / "train.json"), "--nodes", "3")

    out = completed.stdout
    assert completed.returncode == 0, completed.stderr
    assert out.startswith("Starting federated training: my-model-v1  nodes=3  rounds=5\n")
    for label in (
        "Rounds completed:  5/5",
        "Total samples:     4800",
        "Final avg loss:",
        "Eval loss:",
        "Eval accuracy:",
        "Duration:",
        "Node credits (samples processed):",
        "  node-000: 1600 samples",
        "  node-002: 1600 samples",
    ):
        assert label in out


def test_run_options_override_the_config(tmp_path: Path) -> None:
    completed = cli("run", "--nodes", "2", "--rounds", "2", "--seed", "7", "--json")

    summary = json.loads(completed.stdout)
    assert (summary["num_nodes"], summary["rounds_completed"]) == (2, 2)


def test_run_is_deterministic_for_a_seed() -> None:
    first = json.loads(cli("run", "--rounds", "2", "--seed", "3", "--json").stdout)
    second = json.loads(cli("run", "--rounds", "2", "--seed", "3", "--json").stdout)
    other = json.loads(cli("run", "--rounds", "2", "--seed", "4", "--json").stdout)

    assert first["history"][-1]["avg_loss"] == second["history"][-1]["avg_loss"]
    assert first["history"][-1]["avg_loss"] != other["history"][-1]["avg_loss"]


def test_checkpointed_run_resumes(tmp_path: Path) -> None:
    cli("run", "--rounds", "2", "--checkpoint-dir", str(tmp_path), "--json")

    refused = cli("run", "--rounds", "4", "--checkpoint-dir", str(tmp_path))
    resumed = cli("run", "--rounds", "4", "--checkpoint-dir", str(tmp_path), "--resume", "--json")

    assert_one_line_error(refused, "already holds a checkpoint of round 2")
    assert json.loads(resumed.stdout)["rounds_completed"] == 4


def test_hash_is_the_standard_library_digest(tmp_path: Path) -> None:
    gradients = {"weight": [0.1, -0.2, 0.05, 0.03], "bias": [0.01]}
    update = write_update(tmp_path / "u.json", gradients)

    completed = cli("hash", "--update", str(update))

    expected = hashlib.sha256(json.dumps(gradients, sort_keys=True).encode()).hexdigest()
    assert completed.returncode == 0 and completed.stdout.strip() == expected


def test_verify_passes_and_fails_with_exit_codes(tmp_path: Path) -> None:
    update = write_update(tmp_path / "u.json", {"w": [0.5, 0.25]})
    digest = cli("hash", "--update", str(update)).stdout.strip()

    passed = cli("verify", "--update", str(update), "--hash", digest.upper())
    write_update(update, {"w": [0.5, 0.250001]})
    failed = cli("verify", "--update", str(update), "--hash", digest)

    assert passed.returncode == 0
    assert passed.stdout.strip() == f"Verification PASSED.  Hash: {digest}"
    assert failed.returncode == 1 and failed.stdout.startswith("Verification FAILED.")
    assert digest in failed.stdout


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (None, ["cannot read update file", "No such file"]),
        ("{not json", ["invalid update file", "Invalid JSON"]),
        (
            '{"node_id": "n", "round_id": 1, "gradients": {"w": ["x"]}, "loss": 1, '
            '"samples_used": 1}',
            ["gradient 'w': holds a string, not numbers"],
        ),
        (
            '{"node_id": "n", "round_id": 1, "gradients": {"w": [10000000000000000000000]}, '
            '"loss": 1, "samples_used": 1}',
            ["gradient 'w': holds values that are not numbers, or ints too large for 64 bits"],
        ),
        (
            '{"node_id": "n", "round_id": 1, "gradients": {}, "loss": 1, "samples_used": 1, '
            '"extra": 1}',
            ["unknown key 'extra'"],
        ),
        (
            '{"node_id": "n", "round_id": 1, "gradients": {}, "loss": NaN, "samples_used": 1}',
            ["loss"],
        ),
    ],
)
def test_bad_update_files_are_one_line_errors(
    tmp_path: Path, content: str | None, needles: list[str]
) -> None:
    path = tmp_path / "update.json"
    if content is not None:
        path.write_text(content)

    for command in ("hash", "verify"):
        extra = ["--hash", "0" * 64] if command == "verify" else []
        assert_one_line_error(cli(command, "--update", str(path), *extra), *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["verify", "--update", "x.json", "--hash", "nothex"], ["--hash", "SHA-256"]),
        (["run", "--nodes", "0"], ["--nodes"]),
        (["run", "--bogus"], ["--bogus"]),
        (["run", "--resume"], ["--resume needs --checkpoint-dir"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], needles: list[str]) -> None:
    assert_one_line_error(cli(*args), *needles)


def test_bad_config_files_are_one_line_errors(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"model_name": "m", "learning_rat": 0.1}')
    negative = tmp_path / "negative.json"
    negative.write_text('{"local_steps": -1}')

    assert_one_line_error(cli("run", "--config", str(unknown)), "unknown key 'learning_rat'")
    assert_one_line_error(cli("run", "--config", str(negative)), "local_steps")
    assert_one_line_error(cli("run", "--config", str(tmp_path)), "cannot read config file")


def test_a_diverging_run_fails_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "diverge.json"
    config.write_text('{"learning_rate": 1e200, "global_rounds": 2, "num_nodes": 2}')

    completed = cli("run", "--config", str(config), "--json")

    assert completed.returncode == 1, (completed.stdout, completed.stderr)
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), completed.stderr
    assert "round 1: 0 of 2 nodes sent an update that counts" in lines[0]
    assert "node-000: non-finite loss nan: the node's local training diverged" in lines[0]
    assert "lower inner learning_rate" in lines[0]


def test_a_failing_run_reports_a_validation_error_on_one_line() -> None:
    from pydantic import ValidationError

    from aumai_fedtrain.cli.errors import one_line
    from aumai_fedtrain.models import LocalUpdate

    with pytest.raises(ValidationError) as info:
        LocalUpdate(node_id="n", round_id=1, gradients={}, loss=float("nan"), samples_used=1)

    message = one_line(info.value)

    assert "\n" not in message and message.startswith("loss: ")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"global_rounds": "5"}', "global_rounds: Input should be a valid integer"),
        ('{"global_rounds": true}', "global_rounds: Input should be a valid integer"),
        ('{"nesterov": "yes"}', "nesterov: Input should be a valid boolean"),
        ('{"simulation": {"hidden_units": "8"}}', "simulation.hidden_units"),
    ],
)
def test_config_files_are_strict(tmp_path: Path, content: str, needle: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(content)

    completed = cli("run", "--config", str(config))

    assert_one_line_error(completed, needle)
    assert completed.stdout == ""


def test_the_node_count_has_a_sanity_bound() -> None:
    assert_one_line_error(cli("run", "--nodes", "1000001"), "--nodes", "1<=x<=1000000")


def test_a_quorum_above_the_node_count_is_refused_before_training() -> None:
    completed = cli("run", "--nodes", "3", "--min-nodes", "4")

    assert_one_line_error(completed, "--min-nodes 4 exceeds the 3 nodes of the run")
    assert completed.stdout == ""


def test_a_refused_run_prints_only_its_error(tmp_path: Path) -> None:
    assert cli("run", "--rounds", "2", "--checkpoint-dir", str(tmp_path)).returncode == 0

    again = cli("run", "--rounds", "2", "--checkpoint-dir", str(tmp_path))
    fewer = cli("run", "--rounds", "1", "--checkpoint-dir", str(tmp_path), "--resume")

    assert_one_line_error(again, "already holds a checkpoint of round 2")
    assert_one_line_error(fewer, "already completed 2 rounds; --rounds 1 is below that")
    assert again.stdout == fewer.stdout == ""


def test_an_unusable_checkpoint_dir_fails_before_any_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    completed = cli("run", "--checkpoint-dir", str(blocker / "checkpoints"))

    assert_one_line_error(completed, "checkpoint directory")
    assert completed.stdout == ""


def test_a_resumed_run_may_lose_a_node_and_keeps_its_credits(tmp_path: Path) -> None:
    first = cli("run", "--nodes", "3", "--rounds", "2", "--checkpoint-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr

    resumed = cli(
        "run", "--nodes", "2", "--rounds", "3", "--checkpoint-dir", str(tmp_path), "--resume",
        "--json",
    )  # fmt: skip

    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    per_round = 10 * 32
    assert summary["rounds_completed"] == 3
    assert summary["credits"] == {
        "node-000": 3 * per_round, "node-001": 3 * per_round, "node-002": 2 * per_round
    }  # fmt: skip
    assert [record["num_participants"] for record in summary["history"]] == [3, 3, 2]


def test_an_empty_checkpoint_dir_is_refused() -> None:
    assert_one_line_error(cli("run", "--checkpoint-dir", ""), "--checkpoint-dir is empty")
