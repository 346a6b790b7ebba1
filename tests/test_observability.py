"""Seeing a run: metrics.jsonl, trackers read back with their own readers, the coordinator's
live metrics, JSON logs, status, the report (and its screenshot in a real browser), progress.

One real CLI run (module fixture) trains 4 rounds of the built-in model with node-001 dropped
in round 2 (a NaN loss) and every observer on; the tests read what it left.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aumai_fedtrain import TrainingConfig
from aumai_fedtrain.cli.observe import RoundProgress
from aumai_fedtrain.models import PHASES, GlobalState, RoundRecord
from aumai_fedtrain.network.local import free_port
from aumai_fedtrain.network.wire import expected_tensors, request_body_bytes
from aumai_fedtrain.observability import read_metrics
from aumai_fedtrain.observability.report import PLOTS
from aumai_fedtrain.simulation import initial_model
from tests.helpers import CLI_TIMEOUT
from tests.observed_trainers import FAILING_NODE, FAILING_ROUND, SCRAPE_ROUND

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 4
RECORD_FIELDS = set(RoundRecord.model_fields)


@dataclass
class ObservedRun:
    folder: Path
    checkpoint_dir: Path
    summary: dict[str, Any]
    stderr: str
    scrape: str
    lines: list[dict[str, Any]]


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aumai_fedtrain", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> ObservedRun:
    folder = tmp_path_factory.mktemp("observed")
    port = free_port()
    scrape = folder / "scrape.txt"
    done = cli(
        "run",
        "--trainer", "tests.observed_trainers:flaky",
        "--model-init", "aumai_fedtrain.simulation:initial_model",
        "--evaluator", "tests.observed_trainers:evaluate",
        "--rounds", str(ROUNDS),
        "--checkpoint-dir", "run",
        "--tensorboard", "tb",
        "--mlflow",
        "--prometheus-port", str(port),
        "--log-format", "json",
        "--json",
        cwd=folder,
        env={
            "AUMAI_TEST_SCRAPE_URL": f"http://127.0.0.1:{port}/metrics",
            "AUMAI_TEST_SCRAPE_FILE": str(scrape),
        },
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [
        json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    return ObservedRun(
        folder, folder / "run", json.loads(done.stdout), done.stderr, scrape.read_text(), lines
    )


def test_metrics_file_has_one_line_per_round_with_every_field(observed: ObservedRun) -> None:
    shapes = expected_tensors(initial_model(TrainingConfig()))

    assert [line["round_id"] for line in observed.lines] == list(range(1, ROUNDS + 1))
    for line in observed.lines:
        assert set(line) == RECORD_FIELDS
        assert set(line["phase_seconds"]) == set(PHASES)
        assert line["num_nodes"] == 3
        assert line["bytes_to_nodes"] == 3 * request_body_bytes(line["round_id"], shapes)
        values = sum(math.prod(shape) for shape in shapes.values())
        counted = line["num_participants"]
        assert counted * 8 * values < line["bytes_from_nodes"] < counted * (8 * values + 4096)
        times = line["node_times"]
        assert times["kind"] == "training"
        assert sorted(times["per_node"]) == ["node-000", "node-001", "node-002"]
        assert times["max"] == max(times["per_node"].values())
        assert line["eval_loss"] is not None and line["eval_accuracy"] is not None
    failing = observed.lines[FAILING_ROUND - 1]
    assert list(failing["dropped"]) == [FAILING_NODE]
    assert failing["dropped"][FAILING_NODE].startswith("non-finite loss nan")
    assert failing["participants"] == ["node-000", "node-002"]
    assert all(not line["dropped"] for i, line in enumerate(observed.lines) if i != 1)


def test_the_json_summary_has_the_runs_byte_totals_and_history(observed: ObservedRun) -> None:
    summary = observed.summary

    assert summary["bytes_to_nodes"] == sum(line["bytes_to_nodes"] for line in observed.lines)
    assert summary["bytes_from_nodes"] == sum(line["bytes_from_nodes"] for line in observed.lines)
    for entry, line in zip(summary["history"], observed.lines, strict=True):
        # the checkpoint's time is measured after the record entered the checkpoint
        phases = {k: v for k, v in line["phase_seconds"].items() if k != "checkpoint"}
        assert entry == {**line, "phase_seconds": phases}


def test_json_logs_give_one_object_per_event(observed: ObservedRun) -> None:
    events = [json.loads(line) for line in observed.stderr.splitlines() if line.strip()]

    rounds = [event for event in events if event.get("event") == "round"]
    assert [event["record"]["round_id"] for event in rounds] == list(range(1, ROUNDS + 1))
    assert all({"time", "level", "logger", "message"} <= set(event) for event in events)
    drops = [event for event in events if event.get("event") == "dropped"]
    assert len(drops) == 1 and drops[0]["level"] == "WARNING"
    assert drops[0]["round_id"] == FAILING_ROUND and FAILING_NODE in drops[0]["dropped"]


def test_tensorboard_events_hold_each_rounds_metrics(observed: ObservedRun) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(observed.folder / "tb"))
    events.Reload()

    for tag, field in (("loss/train", "avg_loss"), ("loss/eval", "eval_loss"),
                       ("eval/accuracy", "eval_accuracy"), ("bytes/to_nodes", "bytes_to_nodes"),
                       ("nodes/participants", "num_participants")):  # fmt: skip
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == list(range(1, ROUNDS + 1)), tag
        expected = [float(line[field]) for line in observed.lines]
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6), tag
    assert [s.value for s in events.Scalars("nodes/dropped")] == [0, 1, 0, 0]


def test_mlflow_holds_the_params_and_each_rounds_metrics(observed: ObservedRun) -> None:
    from mlflow.tracking import MlflowClient

    store = observed.folder / "mlflow.db"  # MLflow's default local store, in the run's folder
    assert store.exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("mlp-synthetic").experiment_id])

    assert run.info.status == "FINISHED"
    assert run.data.params["local_steps"] == "10"
    assert run.data.params["simulation.hidden_units"] == "256"
    for key, field in (("loss/train", "avg_loss"), ("loss/eval", "eval_loss"),
                       ("bytes/from_nodes", "bytes_from_nodes")):  # fmt: skip
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, ROUNDS + 1))
        assert [m.value for m in history] == pytest.approx([line[field] for line in observed.lines])


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_coordinators_live_metrics_count_the_rounds_so_far(observed: ObservedRun) -> None:
    values = metric_values(observed.scrape)  # scraped during round SCRAPE_ROUND
    done = SCRAPE_ROUND - 1
    last = observed.lines[done - 1]

    assert values[("fedtrain_round", ())] == done
    assert values[("fedtrain_rounds_completed_total", ())] == done
    assert values[("fedtrain_participants", ())] == last["num_participants"] == 2
    assert values[("fedtrain_eval_loss", ())] == last["eval_loss"]
    assert values[("fedtrain_dropped_nodes_total", (("reason", "diverged"),))] == 1
    assert values[("fedtrain_dropped_nodes_total", (("reason", "timeout"),))] == 0
    expected_bytes = sum(line["bytes_to_nodes"] for line in observed.lines[:done])
    assert values[("fedtrain_bytes_to_nodes_total", ())] == expected_bytes


def test_status_shows_config_round_credits_drops_and_last_round(observed: ObservedRun) -> None:
    table = cli("status", "run", cwd=observed.folder)
    as_json = cli("status", "run", "--json", cwd=observed.folder)

    assert table.returncode == 0 and as_json.returncode == 0, table.stderr + as_json.stderr
    status = json.loads(as_json.stdout)
    assert status["completed_round"] == ROUNDS and status["global_rounds"] == ROUNDS
    assert status["config"]["local_steps"] == 10
    assert status["credits"] == observed.summary["credits"]
    assert status["last_round"] == observed.lines[-1]
    assert status["bytes_to_nodes"] == observed.summary["bytes_to_nodes"]
    assert f"Last completed round: {ROUNDS}/{ROUNDS}" in table.stdout
    assert re.search(r"node-001\s+960\n", table.stdout), table.stdout  # 3 of 4 rounds
    assert f"No node dropped or benched in round {ROUNDS}." in table.stdout


def test_status_reads_the_last_complete_line_while_the_run_writes(
    observed: ObservedRun, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(observed.checkpoint_dir, run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    # the last round's checkpoint is written, its metrics line only half
    (run / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])

    done = cli("status", str(run), "--json", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["completed_round"] == ROUNDS  # the checkpoint's history has the round
    assert status["last_round"]["round_id"] == ROUNDS
    assert "checkpoint" not in status["last_round"]["phase_seconds"]


def test_status_of_a_folder_without_a_run_is_a_one_line_error(tmp_path: Path) -> None:
    done = cli("status", str(tmp_path), cwd=tmp_path)

    assert done.returncode == 2
    assert done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1
    assert "holds no run" in done.stderr


def embedded_images(page: str) -> dict[str, bytes]:
    found = re.findall(
        r'<figure id="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page
    )
    return {name: base64.b64decode(data) for name, data in found}


def test_report_writes_html_embedding_every_plot_and_a_png(
    observed: ObservedRun, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(observed.checkpoint_dir, run)

    done = cli("report", str(run), cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    page = (run / "report.html").read_text()
    images = embedded_images(page)
    assert list(images) == [name for name, _, _ in PLOTS]
    for data in images.values():
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert 'src="http' not in page and "<script" not in page  # self-contained
    assert re.search(rf"<td>{FAILING_ROUND}</td><td>{FAILING_NODE}</td><td>diverged</td>", page)
    picture = matplotlib.image.imread(run / "report.png")
    assert picture.ndim == 3 and picture.shape[0] > 600 and picture.shape[1] > 800
    assert (picture[..., :3] < 0.9).mean() > 0.05  # plots, not a blank page


def test_report_works_on_the_metrics_file_alone(observed: ObservedRun, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    shutil.copy(observed.checkpoint_dir / "metrics.jsonl", metrics)

    done = cli("report", str(metrics), cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert list(embedded_images((tmp_path / "report.html").read_text())) == [n for n, _, _ in PLOTS]
    assert matplotlib.image.imread(tmp_path / "report.png").ndim == 3


def colored(pixels: np.ndarray) -> int:
    """Pixels with a clear hue (plot lines, bars, cells), not grey text or white paper."""
    rgb = pixels[..., :3].astype(np.float64)
    rgb = rgb / 255.0 if rgb.max() > 1 else rgb
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).sum())


def test_the_report_renders_its_plots_in_a_real_browser(
    observed: ObservedRun, tmp_path: Path
) -> None:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium is missing: tests/run.sh installs Debian's chromium package")
    run = tmp_path / "run"
    shutil.copytree(observed.checkpoint_dir, run)
    assert cli("report", str(run), cwd=tmp_path).returncode == 0
    page = (run / "report.html").read_text()
    shot = tmp_path / "screenshot.png"

    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1000,3200", (run / "report.html").as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip

    screenshot = matplotlib.image.imread(shot)
    embedded = sum(
        colored(matplotlib.image.imread(io_png(data))) for data in embedded_images(page).values()
    )
    assert screenshot.shape[0] == 3200
    # the plots drawn: the page shows most of the coloured pixels of its embedded images
    assert colored(screenshot) > 0.5 * embedded
    rows = np.flatnonzero(
        (np.abs(np.diff(screenshot[..., :3], axis=-1)).max(axis=-1) > 0.25).any(axis=1)
    )
    bands = {int(row) // 200 for row in rows}
    assert len(bands) >= 6, bands  # colour spread over the page, one band per plot or more


def io_png(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def test_progress_shows_round_nodes_eval_loss_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    now = [100.0]
    progress = RoundProgress(total=10, enabled=True, clock=lambda: now[0])
    progress.start(GlobalState(round_id=2))  # resumed after round 2
    progress.node_done(1, 4)
    now[0] += 30.0
    progress(RoundRecord(round_id=3, avg_loss=1.5, total_samples=1, num_participants=4,
                         duration_seconds=30.0, eval_loss=1.25, eval_accuracy=0.5))  # fmt: skip
    progress.node_done(2, 4)
    progress.close()

    shown = capsys.readouterr().err.split("\r")  # (click drops the clear-line code off a tty)
    assert shown[1].strip() == "round 3/10  nodes 1/4  ETA --"
    assert shown[2].strip() == "round 3/10  loss 1.500000  eval loss 1.250000  acc 50.00%  ETA 3:30"
    assert shown[3].strip() == (
        "round 4/10  nodes 2/4  |  last: loss 1.500000  eval loss 1.250000  acc 50.00%  ETA 3:30"
    )


def test_progress_stays_off_when_not_a_terminal_or_with_json(tmp_path: Path) -> None:
    plain = cli("run", "--rounds", "2", cwd=tmp_path)
    as_json = cli("run", "--rounds", "2", "--json", cwd=tmp_path)

    assert plain.returncode == 0 and as_json.returncode == 0
    assert "\r" not in plain.stderr and "\r" not in as_json.stderr
    assert "Bytes to nodes:" in plain.stdout


def test_past_64_nodes_a_record_keeps_counts_and_percentiles(
    tmp_path: Path,
) -> None:
    done = cli("run", "--nodes", "70", "--rounds", "2", "--metrics-file", "m.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = read_metrics(tmp_path / "m.jsonl")
    report = cli("report", "m.jsonl", cwd=tmp_path)

    for line in lines:
        assert line.num_nodes == 70 and line.num_participants == 70
        assert line.participants == []
        assert line.node_times is not None and line.node_times.per_node == {}
        assert 0 < line.node_times.p50 <= line.node_times.p90 <= line.node_times.max
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert list(embedded_images(page)) == [name for name, _, _ in PLOTS]
