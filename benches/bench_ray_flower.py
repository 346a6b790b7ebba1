"""aumai-fedtrain on Ray against Flower's Ray simulation engine, side by side in one run.

Both engines run the same work: the built-in task and MLP (``aumai_fedtrain.simulation``),
the same virtual nodes (the same shards), local steps and batch size, on a local Ray with 2
CPUs. The nodes are stateless in both (a fresh AdamW each round: Flower's default client
policy; ``RaySimulationProvider(keep_inner_state=False)``), and both use the 2 CPUs for
training: Flower one CPU per virtual client, aumai two actors of one CPU each. A Flower client
runs aumai's own trainer (``SimulationTrainer.train``) and returns the trained model, which
Flower's FedAvg averages; the trainer's data is built once per worker process in both.

Each contender runs in a fresh subprocess with its own Ray, the contenders alternating. Per
round (rounds 2 and later: round 1 starts the workers) the script reports:

- the round's wall time: aumai's round record without its evaluation phase; Flower's time
  from ``configure_fit`` to the end of ``aggregate_fit`` (evaluation off);
- the training time: the sum of every node's ``train`` call divided by the 2 training slots;
- the per-node overhead: (round time - training time) / nodes, i.e. what the engine costs
  per node beyond training it;
- the driver's peak RSS (``ru_maxrss``) and its growth over the RSS after Ray started, and
  the object store's peak (sampled every 0.1 s from Ray's memory stats), separately.

Run ``python benches/bench_ray_flower.py`` (100 and 1,000 nodes, 3 rounds), after
``pip install -e '.[ray,bench]'``. ``--engines aumai --nodes 1000 10000`` measures aumai alone
at larger counts (the driver's memory against the node count).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

SLOTS = 2
"""Training slots on this machine: two CPUs, one per Flower client or aumai actor."""

RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def config(nodes: int, rounds: int, local_steps: int, batch_size: int) -> Any:
    from aumai_fedtrain import TrainingConfig

    return TrainingConfig(
        num_nodes=nodes,
        global_rounds=rounds,
        local_steps=local_steps,
        batch_size=batch_size,
        seed=0,
        # Outer SGD with learning rate 1 and no momentum is FedAvg: both engines then compute
        # the same model, a check that they did the same work (the final losses agree).
        outer_learning_rate=1.0,
        outer_momentum=0.0,
    )


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def object_store_peak() -> Iterator[dict[str, float]]:
    """Sample the object store's bytes in use every 0.1 s; yields {"peak_mib": ...}."""
    import ray
    from ray._private import internal_api

    state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
    found = {"peak_mib": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                used = internal_api.get_memory_info_reply(state).store_stats.object_store_bytes_used
                found["peak_mib"] = max(found["peak_mib"], used / 2**20)
            except Exception:  # Ray is shutting down: keep the peak so far
                return
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield found
    finally:
        stop.set()
        sampler.join()


def run_aumai(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from aumai_fedtrain import DiLoCoCoordinator
    from aumai_fedtrain.models import RoundRecord
    from aumai_fedtrain.providers.ray import RaySimulationProvider
    from aumai_fedtrain.simulation import simulated_nodes

    training_seconds: list[float] = []

    def timed(provider: RaySimulationProvider, record: RoundRecord) -> None:
        stats = provider.round_stats(record.round_id)
        assert stats is not None
        training_seconds.append(sum(stats.node_seconds.values()))

    run_config = config(args.nodes, args.rounds, args.local_steps, args.batch_size)
    ray.init(address="local", num_cpus=SLOTS, include_dashboard=False, logging_level=logging.ERROR)
    baseline = rss_mib()
    try:
        with object_store_peak() as store:
            started = time.perf_counter()
            with RaySimulationProvider(
                actors=SLOTS, actor_cpus=1.0, keep_inner_state=False
            ) as provider:
                result = DiLoCoCoordinator().run_training(
                    run_config,
                    simulated_nodes(args.nodes),
                    provider,
                    on_round=lambda record: timed(provider, record),
                )
            wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    rounds = [
        record.duration_seconds - (record.phase_seconds or {}).get("evaluate", 0.0)
        for record in result.history
    ]
    return {
        "round_seconds": rounds,
        "training_seconds": [seconds / SLOTS for seconds in training_seconds],
        "final_loss": result.history[-1].avg_loss,
        "wall_seconds": wall,
        "driver_peak_mib": peak_rss_mib(),
        "driver_growth_mib": peak_rss_mib() - baseline,
        "object_store_peak_mib": store["peak_mib"],
    }


def run_flower(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import flwr
    except ImportError:
        raise SystemExit(
            "Flower is not installed: pip install -e '.[ray,bench]' (or --engines aumai)"
        ) from None
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, FitIns, FitRes, Parameters, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from aumai_fedtrain.providers.ray import SimulationFactory
    from aumai_fedtrain.simulation import initial_model, simulated_nodes

    run_config = config(args.nodes, args.rounds, args.local_steps, args.batch_size)
    model = initial_model(run_config)
    keys = sorted(model)
    node_ids = [node.node_id for node in simulated_nodes(args.nodes)]
    round_seconds: list[float] = []
    training_seconds: list[float] = []
    losses: list[float] = []
    factory = SimulationFactory()  # one per worker process: its task (data) built once

    class Client(NumPyClient):
        def __init__(self, node_id: str) -> None:
            self.node_id = node_id

        def fit(
            self, parameters: list[np.ndarray], fit_config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            started = time.perf_counter()
            trainer = factory(self.node_id, run_config)
            delta, loss, samples = trainer.train(
                int(fit_config["round"]), dict(zip(keys, parameters, strict=True))
            )
            trained = [value - delta[key] for key, value in zip(keys, parameters, strict=True)]
            return trained, samples, {"train_s": time.perf_counter() - started, "loss": loss}

    def client_fn(context: Context) -> Any:
        return Client(node_ids[int(context.node_config["partition-id"])]).to_client()

    class TimedFedAvg(FedAvg):
        def configure_fit(
            self, server_round: int, parameters: Parameters, client_manager: ClientManager
        ) -> list[tuple[ClientProxy, FitIns]]:
            self._started = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(
            self,
            server_round: int,
            results: list[tuple[ClientProxy, FitRes]],
            failures: list[Any],
        ) -> tuple[Parameters | None, dict[str, Any]]:
            aggregated = super().aggregate_fit(server_round, results, failures)
            round_seconds.append(time.perf_counter() - self._started)
            if failures or len(results) != args.nodes:
                raise RuntimeError(f"round {server_round}: {len(failures)} clients failed")
            training_seconds.append(
                sum(float(res.metrics["train_s"]) for _, res in results) / SLOTS
            )
            samples = [res.num_examples for _, res in results]
            losses.append(
                float(np.average([res.metrics["loss"] for _, res in results], weights=samples))
            )
            return aggregated

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.nodes,
        min_available_clients=args.nodes,
        initial_parameters=ndarrays_to_parameters([model[key] for key in keys]),
        on_fit_config_fn=lambda server_round: {"round": server_round},
    )

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(args.rounds))

    baseline = rss_mib()
    started = time.perf_counter()
    stores: dict[str, float] = {"peak_mib": 0.0}
    watcher = threading.Thread(target=_watch_flower_store, args=(stores,), daemon=True)
    watcher.start()
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=args.nodes,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": SLOTS, "include_dashboard": False, "logging_level": 40},
        },
    )
    wall = time.perf_counter() - started
    stores["done"] = 1.0
    watcher.join()
    if len(round_seconds) != args.rounds:
        raise RuntimeError(f"Flower ran {len(round_seconds)} of {args.rounds} rounds")
    return {
        "round_seconds": round_seconds,
        "training_seconds": training_seconds,
        "final_loss": losses[-1],
        "wall_seconds": wall,
        "driver_peak_mib": peak_rss_mib(),
        "driver_growth_mib": peak_rss_mib() - baseline,
        "object_store_peak_mib": stores["peak_mib"],
        "flower": flwr.__version__,
    }


def _watch_flower_store(found: dict[str, float]) -> None:
    """Flower starts Ray itself: wait for it, then sample its object store like aumai's."""
    import ray

    while "done" not in found and not ray.is_initialized():
        time.sleep(0.05)
    if "done" in found:
        return
    with object_store_peak() as store:
        while "done" not in found and ray.is_initialized():
            time.sleep(0.1)
    found["peak_mib"] = store["peak_mib"]


def child(args: argparse.Namespace) -> None:
    """Run one contender and print its measurements as one JSON line."""
    os.environ.update(RAY_ENVIRONMENT)
    run = run_aumai if args.child == "aumai" else run_flower
    print("RESULT " + json.dumps(run(args)), flush=True)


def measure(engine: str, nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        engine,
        "--nodes",
        str(nodes),
        "--rounds",
        str(args.rounds),
        "--local-steps",
        str(args.local_steps),
        "--batch-size",
        str(args.batch_size),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | RAY_ENVIRONMENT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise SystemExit(f"{engine} at {nodes} nodes failed:\n" + "\n".join(tail))
    found: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return found


def steady(values: list[float]) -> float:
    """Median over rounds 2 and later (round 1 starts the workers)."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def row(engine: str, nodes: int, found: dict[str, Any]) -> dict[str, Any]:
    round_s = steady(found["round_seconds"])
    training_s = steady(found["training_seconds"])
    return {
        "engine": engine,
        "nodes": nodes,
        "round_s": round_s,
        "rounds_per_s": 1 / round_s,
        "training_s": training_s,
        "overhead_ms": 1e3 * (round_s - training_s) / nodes,
        "first_round_s": found["round_seconds"][0],
        "driver_peak_mib": found["driver_peak_mib"],
        "driver_growth_mib": found["driver_growth_mib"],
        "store_peak_mib": found["object_store_peak_mib"],
        "final_loss": found["final_loss"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--engines", nargs="+", choices=["aumai", "flower"], default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", choices=["aumai", "flower"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.nodes = args.nodes[0]
        child(args)
        return 0

    engines = args.engines or ["aumai", "flower"]
    print(f"Command: `{shlex.join(['python', *sys.argv])}`")
    print(f"Load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for nodes in args.nodes:
        order = engines if nodes % 2 == 0 else engines[::-1]
        for engine in order:
            print(f"  {engine}, {nodes:,} nodes ...", flush=True)
            rows.append(row(engine, nodes, measure(engine, nodes, args)))
    print(f"Load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(
        "| Engine | Nodes | Round (s) | Rounds/s | Training (s) | Overhead per node (ms) "
        "| Round 1 (s) | Driver peak RSS (MiB) | Driver growth (MiB) | Object store peak (MiB) "
        "| Final train loss |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['engine']} | {r['nodes']:,} | {r['round_s']:.2f} | {r['rounds_per_s']:.3f} | "
            f"{r['training_s']:.2f} | {r['overhead_ms']:.2f} | {r['first_round_s']:.2f} | "
            f"{r['driver_peak_mib']:.0f} | {r['driver_growth_mib']:.0f} | "
            f"{r['store_peak_mib']:.0f} | {r['final_loss']:.4f} |"
        )
    by_key = {(r["engine"], r["nodes"]): r for r in rows}
    for nodes in args.nodes:
        mine, theirs = by_key.get(("aumai", nodes)), by_key.get(("flower", nodes))
        if mine and theirs:
            ratio = mine["overhead_ms"] / theirs["overhead_ms"]
            verdict = "met" if ratio <= 1 / 3 else "NOT met"
            speed = mine["rounds_per_s"] / theirs["rounds_per_s"]
            print(
                f"- {nodes:,} nodes: aumai's per-node overhead is {ratio:.3f}x Flower's "
                f"(target <= 0.333: {verdict}); aumai's rounds/s {speed:.2f}x Flower's"
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
