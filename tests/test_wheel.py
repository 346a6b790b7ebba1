"""The release wheel works on its own: built with maturin, installed into a fresh virtualenv.

Builds the abi3 wheel from this checkout (``maturin build --release``), installs it with pip
into a new virtualenv (its dependencies come from PyPI), and runs the installed CLI and the
native backend from there, far from the source tree. Slow (a release build and a pip install,
about two minutes), so every step has its own time bound and the module one overall bound.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import run_cli

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 900  # a cold release build (fat LTO, one codegen unit) on two cores
INSTALL_TIMEOUT = 600
RUN_TIMEOUT = 300

pytestmark = [
    pytest.mark.timeout(BUILD_TIMEOUT + INSTALL_TIMEOUT + 4 * RUN_TIMEOUT),
    pytest.mark.skipif(shutil.which("cargo") is None, reason="building the wheel needs cargo"),
]


@dataclass(frozen=True)
class InstalledWheel:
    """A built wheel and the fresh virtualenv it is installed in."""

    wheel: Path
    venv: Path
    workdir: Path

    def script(self, name: str) -> Path:
        return self.venv / ("Scripts" if os.name == "nt" else "bin") / name

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``program`` from the virtualenv in a directory outside the source tree."""
        return _run([str(self.script(program)), *args], cwd=self.workdir, timeout=RUN_TIMEOUT)


def _clean_env() -> dict[str, str]:
    # Nothing may point the fresh install back at the source tree or force a backend.
    hidden = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "AUMAI_FEDTRAIN_BACKEND")
    return {key: value for key, value in os.environ.items() if key not in hidden}


def _run(command: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _checked(command: list[str], cwd: Path, timeout: int) -> None:
    completed = _run(command, cwd, timeout)
    assert completed.returncode == 0, (
        f"{' '.join(command)} exited {completed.returncode}:\n"
        f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
    )


@pytest.fixture(scope="module")
def installed() -> Iterator[InstalledWheel]:
    with tempfile.TemporaryDirectory(prefix="aumai-fedtrain-wheel-") as tmp:
        root = Path(tmp)
        dist, venv, workdir = root / "dist", root / "venv", root / "work"
        workdir.mkdir()
        _checked(
            [sys.executable, "-m", "maturin", "build", "--release", "--out", str(dist)],
            cwd=REPO,
            timeout=BUILD_TIMEOUT,
        )
        wheels = sorted(dist.glob("*.whl"))
        assert len(wheels) == 1, f"expected one wheel, maturin wrote {wheels}"
        _checked([sys.executable, "-m", "venv", str(venv)], cwd=root, timeout=RUN_TIMEOUT)
        wheel_install = InstalledWheel(wheel=wheels[0], venv=venv, workdir=workdir)
        pip = [str(wheel_install.script("python")), "-m", "pip", "--disable-pip-version-check"]
        _checked([*pip, "install", "--quiet", str(wheels[0])], cwd=root, timeout=INSTALL_TIMEOUT)
        yield wheel_install


def test_the_wheel_is_abi3_and_carries_the_extension_and_types(installed: InstalledWheel) -> None:
    # name-version-python-abi-platform.whl (PEP 427), and the same tag inside the wheel.
    _, _, python_tag, abi_tag, platform_tag = installed.wheel.stem.split("-")
    with zipfile.ZipFile(installed.wheel) as archive:
        names = archive.namelist()
        wheel_file = next(name for name in names if name.endswith(".dist-info/WHEEL"))
        metadata = archive.read(wheel_file).decode()

    assert (python_tag, abi_tag) == ("cp311", "abi3")
    assert f"Tag: cp311-abi3-{platform_tag}" in metadata.splitlines()
    if sys.platform == "linux":
        assert platform_tag.startswith("manylinux_") or platform_tag.startswith("manylinux20")
    assert any(name.startswith("aumai_fedtrain/_native.abi3.") for name in names), names
    assert "aumai_fedtrain/py.typed" in names


def test_the_installed_cli_reports_the_version(installed: InstalledWheel) -> None:
    version = installed.wheel.stem.split("-")[1]

    completed = installed.run("aumai-fedtrain", "--version")

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"aumai-fedtrain, version {version}"


def test_the_installed_package_is_the_wheels_and_uses_the_native_backend(
    installed: InstalledWheel,
) -> None:
    probe = (
        "import aumai_fedtrain, aumai_fedtrain.backend as b; "
        "assert b.native_available(), 'native backend missing'; "
        "print(aumai_fedtrain.__file__)"
    )

    completed = installed.run("python", "-c", probe)

    assert completed.returncode == 0, completed.stderr
    location = Path(completed.stdout.strip()).resolve()
    assert location.is_relative_to(installed.venv.resolve()), location


def test_the_installed_cli_trains_like_the_source_tree(installed: InstalledWheel) -> None:
    completed = installed.run("aumai-fedtrain", "run", "--rounds", "1", "--json")
    reference = run_cli("run", "--rounds", "1", "--json", cwd=installed.workdir)

    assert completed.returncode == 0, completed.stderr
    assert reference.returncode == 0, reference.stderr
    result, expected = json.loads(completed.stdout), json.loads(reference.stdout)
    assert result["rounds_completed"] == 1 and len(result["history"]) == 1
    assert result["total_samples"] == sum(result["credits"].values()) > 0
    assert 0.0 < result["final_loss"] < float("inf")
    # The same seed gives the same numbers whether installed from the wheel or the source.
    for run in (result, expected):
        run.pop("duration_seconds")
        for record in run["history"]:
            for timing in ("duration_seconds", "node_times", "phase_seconds"):
                record.pop(timing)
    assert result == expected


def test_without_the_observability_extras_their_options_name_the_extra(
    installed: InstalledWheel,
) -> None:
    # The wheel is installed with its core dependencies only.
    trained = installed.run("aumai-fedtrain", "run", "--rounds", "1", "--metrics-file", "m.jsonl")
    report = installed.run("aumai-fedtrain", "report", "m.jsonl")
    board = installed.run("aumai-fedtrain", "run", "--rounds", "1", "--tensorboard", "tb")

    assert trained.returncode == 0, trained.stderr
    assert (installed.workdir / "m.jsonl").read_text().count("\n") == 1
    assert report.returncode == 2
    assert report.stderr == (
        "Error: matplotlib is not installed; install the report extra: "
        "pip install 'aumai-fedtrain[report]'\n"
    )
    assert board.returncode == 2
    assert "install the tensorboard extra" in board.stderr and board.stderr.count("\n") == 1
