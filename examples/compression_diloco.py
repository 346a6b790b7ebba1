"""Compressed pseudo-gradients in DiLoCo: test loss and bytes of every codec of
:mod:`aumai_fedtrain.compression`, with and without error feedback.

The setup is the DiLoCo H = 50 run of ``docs/experiments.md`` (8 workers with Dirichlet(0.5)
label skew, ``cluster_std = 1.5``, 16,384 samples each, 4,000 inner steps of batch 32 at inner
lr 0.003, outer Nesterov lr 0.7, momentum 0.9, kept inner state), through the library itself
(:class:`SimulationProvider` and :class:`DiLoCoCoordinator`), with the codec chosen in
``TrainingConfig.compression``: each worker encodes its pseudo-gradient
(:class:`~aumai_fedtrain.compression.CompressingTrainer`, which keeps the error-feedback
residual in the node's state); the coordinator averages the decoded values, as a coordinator
that dequantises the bodies it receives does.

Bytes, summed over the run and the 8 workers:

- upstream: the run's ``RoundRecord`` ``bytes_from_nodes``: with a codec, the length of each
  update's compressed safetensors body (:func:`~aumai_fedtrain.compression.encode_body`:
  codes, scales, header and the update's metadata); without, today's float64 wire body
  (tensors, header and metadata), the baseline of "fewer than float64" (same seed);
- downstream: the global parameters, uncompressed (``bytes_to_nodes``);
- synchronous data parallelism's upstream in the same setup, for reference: one float64
  gradient per worker and step, 4,000 x 8 x 11,018 x 8 bytes (payload only, as in the first
  experiment's table).

``python examples/compression_diloco.py`` runs the documented experiment (5 seeds, every
variant); ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

from aumai_fedtrain.compression import Codec, CodecName
from aumai_fedtrain.coordinator import DiLoCoCoordinator
from aumai_fedtrain.models import CompressionConfig, TrainingConfig
from aumai_fedtrain.simulation import (
    SimulationProvider,
    SyntheticTask,
    initial_model,
    mlp,
    simulated_nodes,
)
from robust_attacks import experiment_config  # this folder: the robust experiment's setup

VARIANTS: tuple[tuple[CodecName, int, bool], ...] = (
    ("none", 128, False),
    ("fp16", 128, False),
    ("bf16", 128, False),
    ("int8", 128, False),
    ("int8", 128, True),
    ("int4", 128, False),
    ("int4", 128, True),
    ("int4", 256, True),
    ("e3m0", 128, False),
    ("e3m0", 128, True),
    ("e3m0", 256, True),
)
"""(codec, block size, error feedback) of every run."""


@dataclass
class Cell:
    """One variant: per seed, the test loss and the run's bytes."""

    variant: str
    losses: list[float] = field(default_factory=list)
    upstream: list[int] = field(default_factory=list)
    downstream: list[int] = field(default_factory=list)
    seconds: float = 0.0


def run(config: TrainingConfig, codec: Codec, error_feedback: bool) -> tuple[float, int, int]:
    """Test loss, upstream bytes and downstream bytes of one run."""
    compression = CompressionConfig(
        codec=codec.name, block_size=codec.block_size, error_feedback=error_feedback
    )
    config = config.model_copy(update={"compression": compression})
    result = DiLoCoCoordinator().run_training(
        config, simulated_nodes(config.num_nodes), SimulationProvider()
    )
    state = result.final_state
    assert state is not None and state.parameters is not None
    features, labels = SyntheticTask(config.simulation, config.seed, cache_size=0).eval_set()
    half = len(labels) // 2
    loss = mlp.evaluate(state.parameters, features[half:], labels[half:])[0]
    upstream = sum(record.bytes_from_nodes for record in result.history)
    downstream = sum(record.bytes_to_nodes for record in result.history)
    return loss, upstream, downstream


def name_of(codec: CodecName, block: int, error_feedback: bool) -> str:
    if codec in ("none", "fp16", "bf16"):
        return "float64 (none)" if codec == "none" else codec
    return f"{codec}, block {block}" + (", error feedback" if error_feedback else "")


def print_table(cells: list[Cell], sync_upstream: int) -> None:
    clean = cells[0]
    print(
        "| variant | test loss | vs float64 | per seed vs float64 | upstream bytes | "
        "fewer than float64 | fewer than sync | downstream bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for cell in cells:
        gaps = [loss / base - 1 for loss, base in zip(cell.losses, clean.losses, strict=True)]
        mean_loss = statistics.fmean(cell.losses)
        upstream = statistics.fmean(cell.upstream)
        print(
            f"| {cell.variant} | {mean_loss:.4f} | "
            f"{(mean_loss / statistics.fmean(clean.losses) - 1) * 100:+.1f}% | "
            + ", ".join(f"{gap * 100:+.1f}%" for gap in gaps)
            + f" | {upstream:,.0f} | {statistics.fmean(clean.upstream) / upstream:.1f}x | "
            f"{sync_upstream / upstream:,.0f}x | {statistics.fmean(cell.downstream):,.0f} |"
        )


def main() -> None:
    """Parse the options, run every variant on every seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    config = experiment_config(args.quick)
    parameters = sum(value.size for value in initial_model(config).values())
    steps = config.local_steps * config.global_rounds
    sync_upstream = steps * config.num_nodes * parameters * 8
    cells: list[Cell] = []
    for codec_name, block, error_feedback in VARIANTS:
        cell = Cell(name_of(codec_name, block, error_feedback))
        started = time.perf_counter()
        for seed in args.seeds:
            seeded = config.model_copy(update={"seed": seed})
            loss, upstream, downstream = run(seeded, Codec(codec_name, block), error_feedback)
            cell.losses.append(loss)
            cell.upstream.append(upstream)
            cell.downstream.append(downstream)
        cell.seconds = time.perf_counter() - started
        cells.append(cell)
        print(f"  {cell.variant}: {cell.seconds:.0f} s", flush=True)
    print(f"test loss, mean of seeds {args.seeds}; bytes per run, summed over the 8 workers")
    print_table(cells, sync_upstream)
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(cell) for cell in cells], out, indent=1)


if __name__ == "__main__":
    main()
