"""Every example of the user guide runs, prints what the guide promises, and matches the guide."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CLI_TIMEOUT, run_cli

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
# The project's copy of the user guide: the published guide's code blocks, with notes and a
# real run's output.
GUIDE = REPO / "docs" / "getting-started.md"
# The guide as published: beside the repository in the development workspace, and its copy in
# tests/data (checked equal to it wherever the published one is there) everywhere else.
WORKSPACE_GUIDE = REPO.parent / "shared" / "spec" / "getting-started.md"
PUBLISHED_GUIDE = Path(__file__).resolve().parent / "data" / "published-getting-started.md"
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


def fenced_blocks(guide: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of ``guide``, in order."""
    return re.findall(r"```(\w*)\n(.*?)```", guide.read_text(encoding="utf-8"), flags=re.S)


def test_examples_contain_the_guides_code_verbatim() -> None:
    sources = {path.name: path.read_text() for path in EXAMPLES.glob("*.py")}
    skipped = ("param.grad",)  # the FAQ's PyTorch fragment
    blocks = [code for language, code in fenced_blocks(GUIDE) if language == "python"]
    assert len(blocks) >= 9, f"{GUIDE} lost its python blocks"
    for block in blocks:
        if any(marker in block for marker in skipped):
            continue
        lines = [line for line in block.splitlines() if line.strip()]
        assert any(_contains_in_order(source, lines) for source in sources.values()), (
            f"no example holds this guide block:\n{block}"
        )


def test_the_repos_guide_keeps_the_published_guides_code() -> None:
    # Every block with a language (commands, JSON, Python) is the published one, in order;
    # only the untagged sample output differs: the repo's copy shows a real run's numbers.
    def tagged(guide: Path) -> list[tuple[str, str]]:
        return [block for block in fenced_blocks(guide) if block[0]]

    if WORKSPACE_GUIDE.is_file():  # the copy in tests/data is the published guide
        assert PUBLISHED_GUIDE.read_text() == WORKSPACE_GUIDE.read_text()
    assert tagged(GUIDE) == tagged(PUBLISHED_GUIDE)


def _contains_in_order(source: str, lines: list[str]) -> bool:
    position = 0
    source_lines = source.splitlines()
    for line in lines:
        try:
            position = source_lines.index(line, position) + 1
        except ValueError:
            return False
    return True
