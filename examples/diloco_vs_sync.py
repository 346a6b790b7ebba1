"""DiLoCo versus synchronous data parallelism on the built-in task, at equal compute.

A small-scale reproduction of the central comparison of the DiLoCo paper (Douillard et al.,
arXiv 2311.08105): ``k`` workers with non-i.i.d. data (Dirichlet label skew) train an MLP.

* DiLoCo: every round each worker takes ``H`` AdamW steps from the global model on its own
  shard and sends its pseudo-gradient; the coordinator averages them and applies the outer
  Nesterov step (lr 0.7, momentum 0.9). It runs through the library itself
  (:class:`SimulationProvider` and :class:`DiLoCoCoordinator`), once with each worker keeping
  its AdamW state across rounds as in the paper (the library's default), and once with stateless
  workers (``keep_inner_state=False``), which start every round with a fresh AdamW.
* Synchronous data parallelism: every step each worker computes the gradient of one
  mini-batch of its shard, the ``k`` gradients are averaged and one AdamW step is applied to the
  shared model.

Every method spends the same compute: ``--steps`` mini-batches of ``--batch-size`` per worker.
For each method the inner learning rate is the best of a small grid, chosen on a validation half
of the held-out data (mean over ``--seeds``); the table reports the other (test) half, averaged
over the seeds, and each seed's gap to the synchronous baseline of the same seed. Bytes are the float64 bytes that
cross the network, summed over workers: DiLoCo sends the parameters down and the pseudo-gradient
up once per round; the synchronous baseline sends the gradient up and the new parameters down
once per step.

``python examples/diloco_vs_sync.py`` runs the documented experiment (a few minutes on two
cores); ``--quick`` is a smoke run of a few seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aumai_fedtrain.coordinator import DiLoCoCoordinator
from aumai_fedtrain.models import FederatedNode, SimulationConfig, TensorMap, TrainingConfig
from aumai_fedtrain.simulation import (
    SimulationProvider,
    SyntheticTask,
    initial_model,
    mlp,
    new_inner_optimizer,
)

BYTES_PER_FLOAT = 8  # float64


@dataclass(frozen=True)
class Job:
    """One training run: DiLoCo with ``inner_steps`` = H (None: synchronous) at one lr."""

    config: TrainingConfig
    inner_steps: int | None
    keep_inner_state: bool
    total_steps: int
    eval_every: int

    @property
    def method(self) -> str:
        """Name of the method in the table."""
        if self.inner_steps is None:
            return "synchronous"
        return f"DiLoCo H={self.inner_steps}" + ("" if self.keep_inner_state else " stateless")


@dataclass
class Result:
    """One run's learning curve and final figures."""

    method: str
    learning_rate: float
    seed: int
    steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")
    bytes_sent: int = 0


@dataclass
class Summary:
    """A method at its chosen learning rate, averaged over the seeds."""

    method: str
    learning_rate: float
    steps: list[int]
    val_loss: list[float]
    test_loss: float
    test_accuracy: float
    bytes_sent: int
    seed_test_losses: list[float]


class HeldOut:
    """The simulation's held-out set split into a validation half and a test half."""

    def __init__(self, task: SyntheticTask) -> None:
        features, labels = task.eval_set()
        half = len(labels) // 2
        self.val = features[:half], labels[:half]
        self.test = features[half:], labels[half:]

    def record(self, result: Result, step: int, params: TensorMap) -> None:
        """Append the validation loss at ``step`` to the curve."""
        result.steps.append(step)
        result.val_loss.append(mlp.evaluate(params, *self.val)[0])

    def finish(self, result: Result, params: TensorMap) -> Result:
        """Fill in the final test loss and accuracy."""
        result.test_loss, result.test_accuracy = mlp.evaluate(params, *self.test)
        return result


def round_trip_bytes(params: TensorMap, workers: int) -> int:
    """Bytes of one exchange: every worker receives one model-sized tensor and sends one."""
    return workers * 2 * sum(value.size for value in params.values()) * BYTES_PER_FLOAT


def run_diloco(job: Job) -> Result:
    """DiLoCo with ``job.inner_steps`` inner steps per round, via the library's coordinator."""
    config = job.config
    inner = config.local_steps
    result = Result(job.method, config.learning_rate, config.seed)
    task = SyntheticTask(config.simulation, config.seed)
    held_out = HeldOut(task)
    nodes = [FederatedNode(node_id=f"worker-{i}") for i in range(config.num_nodes)]
    provider = SimulationProvider(keep_inner_state=job.keep_inner_state)
    provider.configure(config)
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(config, nodes, provider.initial_parameters(config))
    assert state.parameters is not None
    exchange = round_trip_bytes(state.parameters, config.num_nodes)
    held_out.record(result, 0, state.parameters)
    for round_id in range(1, config.global_rounds + 1):
        state = coordinator.run_round(state, provider.get_updates(round_id, state, nodes))
        result.bytes_sent += exchange  # parameters down, pseudo-gradient up
        if (round_id * inner) % job.eval_every == 0:
            held_out.record(result, round_id * inner, state.parameters)
    return held_out.finish(result, state.parameters)


def run_sync(job: Job) -> Result:
    """Synchronous data parallelism: average the workers' gradients, one AdamW step per step."""
    config = job.config
    result = Result(job.method, config.learning_rate, config.seed)
    task = SyntheticTask(config.simulation, config.seed)
    held_out = HeldOut(task)
    flat, params = mlp.pack(initial_model(config))
    flat_grads, grads = mlp.pack(params)
    mean_grads = np.empty_like(flat_grads)
    optimizer = new_inner_optimizer(config)
    exchange = round_trip_bytes(params, config.num_nodes)
    held_out.record(result, 0, params)
    for step in range(1, job.total_steps + 1):
        mean_grads.fill(0.0)
        for worker in range(config.num_nodes):
            (batch,) = task.batches(worker, step, 1, config.batch_size)
            mlp.loss_and_grads(params, *batch, out=grads)
            mean_grads += flat_grads
        mean_grads /= config.num_nodes
        optimizer.step({"packed": flat}, {"packed": mean_grads})
        result.bytes_sent += exchange  # gradient up, new parameters down
        if step % job.eval_every == 0:
            held_out.record(result, step, params)
    return held_out.finish(result, params)


def run(job: Job) -> Result:
    """Run one job."""
    return run_sync(job) if job.inner_steps is None else run_diloco(job)


def summarize(results: list[Result]) -> list[Summary]:
    """Per method, the learning rate with the lowest seed-mean final validation loss."""
    runs: dict[str, dict[float, list[Result]]] = {}
    for result in results:
        runs.setdefault(result.method, {}).setdefault(result.learning_rate, []).append(result)
    summaries = []
    for method, by_rate in runs.items():
        rate, chosen = min(
            by_rate.items(), key=lambda item: np.mean([run.val_loss[-1] for run in item[1]])
        )
        summaries.append(
            Summary(
                method=method,
                learning_rate=rate,
                steps=chosen[0].steps,
                val_loss=np.mean([run.val_loss for run in chosen], axis=0).tolist(),
                test_loss=float(np.mean([run.test_loss for run in chosen])),
                test_accuracy=float(np.mean([run.test_accuracy for run in chosen])),
                bytes_sent=chosen[0].bytes_sent,
                seed_test_losses=[run.test_loss for run in chosen],
            )
        )
    return summaries


def pyplot() -> Any:
    """``matplotlib.pyplot`` (drawing to files), or None with a note when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written")
        return None
    return plt


def plot(results: list[Summary], bayes: float, path: Path) -> None:
    """Validation loss against inner steps, and final test loss against bytes sent."""
    plt = pyplot()
    if plt is None:
        return
    figure, (curves, costs) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results:
        style = "--" if result.method.endswith("stateless") else "-"
        label = f"{result.method} (lr {result.learning_rate:g})"
        curves.plot(result.steps, result.val_loss, style, label=label)
        marker = "x" if result.method.endswith("stateless") else "o"
        costs.scatter(result.bytes_sent, result.test_loss, marker=marker, label=result.method)
    curves.axhline(bayes, color="gray", linestyle=":", label="Bayes-optimal")
    curves.set(
        xlabel="inner steps per worker (equal compute)",
        ylabel="validation loss",
        ylim=(0.9 * bayes, max(1.0, 2 * bayes)),
        title="Learning curves",
    )
    costs.set(
        xlabel="bytes communicated, all workers",
        ylabel="final test loss",
        xscale="log",
        title="Final loss against communication",
    )
    curves.legend(fontsize=7)
    costs.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}")


def print_table(results: list[Summary], header: str) -> None:
    """The results as a Markdown table, relative to the synchronous baseline."""
    sync = next(result for result in results if result.method == "synchronous")
    print(header + "\n")
    print(
        "| method | inner lr | test loss | vs sync | per seed vs sync | test accuracy "
        "| bytes sent | fewer bytes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        per_seed = ", ".join(
            f"{100 * (loss / base - 1):+.1f}%"
            for loss, base in zip(result.seed_test_losses, sync.seed_test_losses, strict=True)
        )
        print(
            f"| {result.method} | {result.learning_rate:g} | {result.test_loss:.4f} | "
            f"{100 * (result.test_loss / sync.test_loss - 1):+.1f}% | {per_seed} | "
            f"{result.test_accuracy:.3f} | {result.bytes_sent:,} | "
            f"{sync.bytes_sent / result.bytes_sent:.0f}x |"
        )
    quarters = sorted({(len(sync.steps) - 1) * q // 4 for q in (1, 2, 3, 4)})
    print(
        "\nValidation loss relative to the synchronous baseline along the run (seed means, chosen lr):\n"
    )
    print("| method | " + " | ".join(f"step {sync.steps[i]}" for i in quarters) + " |")
    print("|---|" + "---|" * len(quarters))
    for result in results[1:]:
        print(
            f"| {result.method} | "
            + " | ".join(
                f"{100 * (result.val_loss[i] / sync.val_loss[i] - 1):+.1f}%" for i in quarters
            )
            + " |"
        )


def main() -> None:
    """Parse the options, run every method and report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4000, help="inner steps per worker")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--cluster-std", type=float, default=1.5, help="task noise")
    parser.add_argument(
        "--inner-steps",
        type=int,
        nargs="+",
        default=[1, 10, 50, 100],
        help="H of the DiLoCo runs whose workers keep their AdamW state",
    )
    parser.add_argument(
        "--stateless-inner-steps",
        type=int,
        nargs="*",
        default=[50, 100],
        help="H of the DiLoCo runs with stateless workers (keep_inner_state=False)",
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[3e-4, 1e-3, 3e-3, 1e-2],
        help="inner learning-rate grid (every method picks its best)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds to average over (task, shards, init and batches)",
    )
    parser.add_argument("--plot", type=Path, default=Path("docs/diloco_vs_sync.png"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    simulation = SimulationConfig(
        dirichlet_alpha=args.alpha,
        cluster_std=args.cluster_std,
        samples_per_node=16384,
        eval_samples=8000,
    )
    if args.quick:
        args.steps, args.lrs = 200, [1e-3]
        simulation = simulation.model_copy(
            update={"hidden_units": 32, "samples_per_node": 1024, "eval_samples": 1000}
        )
    eval_every = max(args.inner_steps + args.stateless_inner_steps)
    if args.steps % eval_every:
        parser.error(f"--steps must be a multiple of every inner-steps value ({eval_every})")
    base = TrainingConfig(num_nodes=args.workers, batch_size=args.batch_size, simulation=simulation)
    methods: list[tuple[int | None, bool]] = [(None, False)]
    methods += [(inner, True) for inner in args.inner_steps]
    methods += [(inner, False) for inner in args.stateless_inner_steps]
    jobs = [
        Job(
            base.model_copy(
                update={
                    "learning_rate": lr,
                    "local_steps": inner or 1,
                    "seed": seed,
                    "global_rounds": args.steps // (inner or 1),
                }
            ),
            inner,
            keep,
            args.steps,
            eval_every,
        )
        for inner, keep in methods
        for lr in args.lrs
        for seed in args.seeds
    ]
    started = time.perf_counter()
    results = summarize([run(job) for job in jobs])
    elapsed = time.perf_counter() - started
    bayes = float(
        np.mean(
            [
                task.bayes_loss(*HeldOut(task).test)
                for task in (SyntheticTask(simulation, seed) for seed in args.seeds)
            ]
        )
    )
    if args.json:
        print(
            json.dumps(
                {
                    "elapsed_seconds": elapsed,
                    "bayes_test_loss": bayes,
                    "results": [asdict(result) for result in results],
                }
            )
        )
    else:
        print_table(
            results,
            (
                f"{args.workers} workers, Dirichlet alpha {args.alpha}, cluster_std "
                f"{args.cluster_std}, {args.steps} steps of {args.batch_size} per worker, inner lr "
                f"grid {args.lrs}, mean over seeds {args.seeds}; Bayes-optimal test loss "
                f"{bayes:.4f}; {elapsed:.0f}s"
            ),
        )
    if not args.no_plot:
        plot(results, bayes, args.plot)


if __name__ == "__main__":
    main()
