"""The PyTorch examples run and learn; the language-model experiment runs at a tiny size."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_examples import EXAMPLES
from tests.test_examples import run_example as run_in_process
from tests.test_network_nodes import run_example as run_with_nodes

TINY_LM = [
    "--steps", "10", "--H", "1", "5", "10", "--seeds", "0", "1", "--d-model", "16",
    "--layers", "1", "--heads", "2", "--context", "32", "--batch-size", "4",
    "--max-corpus-bytes", "300000", "--val-bytes", "30000", "--eval-every", "5",
    "--eval-windows", "8", "--plot", "none",
]  # fmt: skip


def test_the_in_process_torch_example_learns_and_its_export_loads(tmp_path: Path) -> None:
    output = run_in_process("torch_diloco.py", tmp_path)

    accuracies = [float(x) for x in re.findall(r"accuracy ([0-9.]+)%", output)]
    assert len(accuracies) == 13 and accuracies[-2] > 90.0
    assert accuracies[-1] == accuracies[-2]  # the exported model is the last global model


def test_the_torch_node_example_trains_over_http_and_exports(tmp_path: Path) -> None:
    output = run_with_nodes("torch_node.py", tmp_path)

    losses = [float(x) for x in re.findall(r"train loss ([0-9.]+)", output)]
    assert len(losses) == 8 and losses[-1] < losses[0] / 10
    assert "Exported the global model after round 8 (4 tensors, 484 values, F32)" in output
    accuracy = float(re.search(r"all four classes: ([0-9.]+)%", output).group(1))
    assert accuracy > 90.0


def test_the_language_model_experiment_runs_at_a_tiny_size(tmp_path: Path) -> None:
    results, manifest = tmp_path / "results.json", tmp_path / "corpus.tsv"

    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "lm_diloco.py"), *TINY_LM,
         "--json", str(results), "--manifest", str(manifest)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    payload = json.loads(results.read_text())
    runs = payload["results"]
    assert [(r["method"], r["seed"]) for r in runs] == [
        (method, seed)
        for seed in (0, 1)
        for method in ("synchronous", "DiLoCo H=1", "DiLoCo H=5", "DiLoCo H=10")
    ]
    sync_bytes = runs[0]["bytes_sent"]
    for run in runs:
        steps = [step for step, _ in run["curve"]]
        assert steps == ([5, 10] if run["h"] in (None, 1, 5) else [10])
        assert all(0.0 < bits < 9.0 for _, bits in run["curve"])  # bits per byte
        assert run["bytes_sent"] * (run["h"] or 1) == sync_bytes
    files = manifest.read_text().splitlines()
    digest = re.search(r"corpus digest .*: ([0-9a-f]{64})", completed.stdout).group(1)
    assert digest == payload["digest"] and len(files) > 3
    assert re.search(r"^\| DiLoCo H=10 \| [0-9.]+ \| [0-9.]+, [0-9.]+ \| [+-][0-9.]+% \| 1 \|",
                     completed.stdout, flags=re.M)  # fmt: skip


def test_the_language_model_runs_in_parallel_processes_give_the_serial_results(
    tmp_path: Path,
) -> None:
    outputs = {processes: tmp_path / f"{processes}.json" for processes in ("1", "2")}

    for processes, output in outputs.items():
        completed = subprocess.run(
            [sys.executable, str(EXAMPLES / "lm_diloco.py"), *TINY_LM,
             "--processes", processes, "--json", str(output)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr

    def runs(path: Path) -> list[dict[str, object]]:
        results = json.loads(path.read_text())["results"]
        return [{k: v for k, v in run.items() if k != "seconds"} for run in results]

    assert runs(outputs["1"]) == runs(outputs["2"])


def test_the_language_model_run_stopped_with_sigterm_leaves_no_process(tmp_path: Path) -> None:
    long_runs = [*TINY_LM, "--steps", "5000", "--H", "1", "--eval-every", "5000", "--no-sync"]
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "lm_diloco.py"), *long_runs, "--processes", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the runs start once the model is described
            if line.startswith("model:"):
                break
        workers = workers_of(process.pid)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 128 + signal.SIGTERM
    assert output.strip().endswith("interrupted after 0 of 2 runs")
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)


def workers_of(parent: int) -> list[int]:
    """The worker processes of the pool of ``parent``, once both are started."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        workers = [
            int(pid)
            for pid in children
            if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        ]
        if len(workers) == 2:
            return workers
        time.sleep(0.1)
    return []


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
