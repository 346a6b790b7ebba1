"""Every example of the user guide runs, prints what the guide promises, and matches the guide."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CLI_TIMEOUT, run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GUIDE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "getting-started.md"
TIMEOUT = CLI_TIMEOUT


def run_example(name: str, cwd: Path) -> str:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_step3_hash_verifies_with_the_cli(tmp_path: Path) -> None:
    digest = run_example("step3_compute_hash.py", tmp_path).strip()

    verified = run_cli(
        "verify", "--update", str(EXAMPLES / "update.json"), "--hash", digest, cwd=tmp_path
    )

    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == f"Verification PASSED.  Hash: {digest}"


def test_step4_reports_a_real_run(tmp_path: Path) -> None:
    output = run_example("step4_custom_provider.py", tmp_path)

    final_loss = float(re.search(r"Final loss:\s+([0-9.]+)", output).group(1))
    total = int(re.search(r"Total samples: (\d+)", output).group(1))
    assert final_loss == pytest.approx(2.718281828 ** (-8 * 0.3), abs=1e-6)
    assert 8 * 4 * 100 <= total <= 8 * 4 * 300
    assert re.search(r"Duration:\s+[0-9.]+s", output)


def test_step5_lists_every_nodes_samples(tmp_path: Path) -> None:
    output = run_example("step5_credits.py", tmp_path)

    credits = dict(re.findall(r"^  (node-\d): (\d+) samples$", output, flags=re.M))
    total = int(re.search(r"Total samples: (\d+)", output).group(1))
    assert sorted(credits) == ["node-0", "node-1", "node-2", "node-3"]
    assert sum(int(v) for v in credits.values()) == total
    assert f"node-0 contributed {credits['node-0']} samples total" in output


def test_pattern1_averages_to_a_tenth_and_a_half(tmp_path: Path) -> None:
    output = run_example("pattern1_single_round.py", tmp_path)

    assert "Initialised at round 0" in output
    assert "After round 1: avg_loss=0.45" in output
    assert "Averaged weights: {'w': array([0.15, 0.15])}" in output


def test_pattern2_verifies(tmp_path: Path) -> None:
    assert "Update from node-0 verified: " in run_example("pattern2_verify_pipeline.py", tmp_path)


def test_pattern4_restores_round_five(tmp_path: Path) -> None:
    output = run_example("pattern4_checkpoint_state.py", tmp_path)

    assert "Restored from round 5" in output
    assert (tmp_path / "checkpoint_round_5.json").is_file()


def test_pattern5_builds_nodes_with_capabilities(tmp_path: Path) -> None:
    output = run_example("pattern5_node_capabilities.py", tmp_path)

    assert "gpu-node-0 (idle): {'gpu': True, 'gpu_model': 'A100'" in output
    assert "cpu-node-1 (idle): {'gpu': False" in output


def test_quickstart_trains(tmp_path: Path) -> None:
    output = run_example("quickstart.py", tmp_path)

    losses = [float(x) for x in re.findall(r"train loss ([0-9.]+)", output)]
    assert len(losses) == 5 and losses[-1] < losses[0]


def guide_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.skipif(not GUIDE.is_file(), reason="the published guide is not beside the repo")
def test_examples_contain_the_guides_code_verbatim() -> None:
    sources = {path.name: path.read_text() for path in EXAMPLES.glob("*.py")}
    skipped = ("param.grad",)  # the FAQ's PyTorch fragment
    for block in guide_python_blocks():
        if any(marker in block for marker in skipped):
            continue
        lines = [line for line in block.splitlines() if line.strip()]
        assert any(_contains_in_order(source, lines) for source in sources.values()), (
            f"no example holds this guide block:\n{block}"
        )


def _contains_in_order(source: str, lines: list[str]) -> bool:
    position = 0
    source_lines = source.splitlines()
    for line in lines:
        try:
            position = source_lines.index(line, position) + 1
        except ValueError:
            return False
    return True
