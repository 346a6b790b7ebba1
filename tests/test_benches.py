"""The benchmark scripts keep working (tiny runs; their timings are never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aumai_fedtrain.backend import native_available

BENCHES = Path(__file__).resolve().parent.parent / "benches"
TIMEOUT = 300


def run_bench(*args: str) -> str:
    completed = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_hot_path_benchmark_prints_its_table() -> None:
    output = run_bench(str(BENCHES / "bench_hot_paths.py"), "--quick")

    assert "| canonical_hash, 10^4 float64 as array | SHA-256 floor" in output
    assert "| weighted_average, N=2 x P=10^3 float64 |" in output
    assert "| wire_digest, 10^4 float64" in output
    assert "| screening scan, 20 updates of 11,018 float64 |" in output
    assert "- read bandwidth: a native scan of" in output
    assert "reading the 15 array arguments" in output
    # The checkpoint's contender is an older revision of the repository, when git has it.
    assert "| save_checkpoint, 20 nodes" in output or "no checkpoint baseline" in output


def test_wire_benchmark_prints_both_formats() -> None:
    output = run_bench(str(BENCHES / "bench_wire.py"), "--floats", "1000", "--repeats", "1")

    assert "/train round trip (ms)" in output
    assert "its 2 wire digests (ms)" in output
    assert "JSON" in output and "binary" in output


def test_robust_benchmark_prints_every_rule_side_by_side() -> None:
    output = run_bench(
        str(BENCHES / "bench_robust.py"),
        "--params",
        "1000",
        "--counts",
        "3",
        "20",
        "--repeats",
        "1",
    )

    assert "| median, N=3 x P=1,000 |" in output
    assert "| trimmed mean (k=2), N=20 x P=1,000 |" in output
    assert "| multi-Krum (f=0), N=3 x P=1,000 |" in output
    assert "| CenteredClip (3 it.), N=3 x P=1,000 |" in output
    assert "| multi-Krum and CenteredClip, N=20 x P=1,000 | skipped" in output
    assert output.count("load average") == 2


def test_dtype_benchmark_prints_both_dtypes_side_by_side() -> None:
    output = run_bench(str(BENCHES / "bench_dtypes.py"), "--quick")

    expected = [
        "| bytes to the nodes | 0.24 MB | 0.12 MB | 0.50",
        "| updates held at the average | 0.24 MB | 0.12 MB | 0.500 |",
        "records equal the lengths of really encoded safetensors bodies: yes",
        "weighted_average, N=4 x P=10,000 (1 runs per dtype)",
        "| input read, best |",
        "load average",
    ]
    assert [text for text in expected if text not in output] == [], output


def test_coordinator_memory_benchmark_runs_real_nodes_both_ways() -> None:
    script = str(BENCHES / "bench_coordinator_memory.py")
    for flags in (["--waiting-memory-mb", "0"], ["--list-path"]):
        output = run_bench(script, "--nodes", "2", "--values", "1000", "--rounds", "1", *flags)

        assert "round 1: 2 updates," in output
        assert "2 nodes x 1,000 float32 values over HTTP on 127.0.0.1" in output
        assert ("list (collect the round" in output) == (flags == ["--list-path"])
        assert ("waiting memory 0 MiB" in output) == (flags != ["--list-path"])
        assert "| round | RSS peak, all in | RSS peak, round |" in output
        assert "\n| 1 | " in output
        assert "load average before:" in output


def test_ray_benchmark_runs_aumai_at_two_node_counts() -> None:
    # Flower (the bench extra) is not installed by the tests: aumai's side alone, on a real Ray.
    output = run_bench(
        str(BENCHES / "bench_ray_flower.py"),
        *("--engines", "aumai", "--nodes", "8", "16", "--rounds", "2", "--local-steps", "2"),
    )

    rows = [line for line in output.splitlines() if line.startswith("| aumai |")]
    assert [row.split(" | ")[1] for row in rows] == ["8", "16"]
    losses = [row.rstrip(" |").rsplit(" | ", 1)[1] for row in rows]
    assert all(float(loss) > 0 for loss in losses)


def test_compression_benchmark_prints_every_codec_beside_the_plain_averages() -> None:
    backend = "native" if native_available() else "python"
    output = run_bench(str(BENCHES / "bench_compression.py"), "--quick", "--backend", backend)

    rows = ["float64 weighted_average", "float32 weighted_average"]
    rows += [f"{codec} average_encoded" for codec in ("int8", "int4", "e3m0", "fp16", "bf16")]
    assert [row for row in rows if f"| {row} |" not in output] == [], output
    assert "| float64 weighted_average | " in output and "| 1.00x |" in output
    assert all(f"| {codec} | " in output for codec in ("int8", "int4", "e3m0", "fp16", "bf16"))
    assert output.count("load average") == 2
