"""The ``aumai-fedtrain`` command line: train (simulated, your own or real nodes), hash, verify,
and see a run (``report``, ``status``).

Every failure is one line on stderr: exit 2 for bad input (files, JSON, config keys, options),
exit 1 for a failed verification or a run that fails.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from aumai_fedtrain import __version__
from aumai_fedtrain.checkpoint import CheckpointError
from aumai_fedtrain.cli.aggregation import (
    AGGREGATION_OPTIONS,
    COMPRESSION_OPTIONS,
    aggregation_options,
    with_aggregation,
    with_compression,
)
from aumai_fedtrain.cli.engines import (
    ENGINE_OPTIONS,
    check_engine_options,
    engine_options,
    engine_session,
    ray_provider,
    sampled,
)
from aumai_fedtrain.cli.errors import InputError, fail, one_line
from aumai_fedtrain.cli.export import export_command
from aumai_fedtrain.cli.network import (
    config_file_option,
    node_command,
    nodes_file_options,
    prepare_http_run,
)
from aumai_fedtrain.cli.observe import (
    OBSERVE_OPTIONS,
    RoundProgress,
    is_terminal,
    observe_options,
    report_command,
    run_observers,
    show_logs,
    status_command,
)
from aumai_fedtrain.cli.plugins import load_evaluator, load_model_init, load_trainer_factory
from aumai_fedtrain.coordinator import DEFAULT_WAITING_MEMORY, DiLoCoCoordinator
from aumai_fedtrain.inputs import load_model_file
from aumai_fedtrain.models import GlobalState, LocalUpdate, RoundRecord, TrainingConfig
from aumai_fedtrain.models import TrainingResult as Result
from aumai_fedtrain.observability.metrics_file import MetricsFileError
from aumai_fedtrain.observability.records import total_bytes
from aumai_fedtrain.providers import InProcessProvider, UpdateProvider
from aumai_fedtrain.verification import HashVerifier, normalize_digest

__all__ = ["MAX_NODES", "cli", "main"]

PROG_NAME = "aumai-fedtrain"
MAX_CREDIT_LINES = 50
MAX_NODES = 1_000_000
"""Most nodes a run may have (a sanity bound: 10,000 virtual nodes on one machine are fine)."""
_MIB = 1024 * 1024


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=PROG_NAME)
def cli() -> None:
    """Federated, low-communication (DiLoCo) training."""


def _load_config(config_path: Path | None, overrides: dict[str, Any]) -> TrainingConfig:
    config = (
        load_model_file(config_path, TrainingConfig, "config", InputError)
        if config_path is not None
        else TrainingConfig()
    )
    return config.model_copy(update={k: v for k, v in overrides.items() if v is not None})


@cli.command()
@config_file_option("TrainingConfig JSON file (default: the built-in configuration).")
@click.option(
    "--nodes",
    type=click.IntRange(1, MAX_NODES),
    help=f"Number of simulated nodes (at most {MAX_NODES:,}).",
)
@click.option("--rounds", type=click.IntRange(min=1), help="Number of global rounds.")
@click.option("--seed", type=int, help="Seed of the data, model and node sampling.")
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    help="Write the run state here after every round.",
)
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in --checkpoint-dir.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--trainer",
    "trainer_spec",
    help="Train the simulated nodes with your trainer factory, module:factory "
    "(default: the built-in MLP).",
)
@click.option(
    "--model-init",
    "model_init_spec",
    help="Your initial global model, module:function(config) (default: the built-in MLP's).",
)
@click.option(
    "--evaluator",
    "evaluator_spec",
    help="Your held-out evaluation, module:function(parameters, config) -> (loss, accuracy).",
)
@click.option(
    "--min-nodes",
    type=click.IntRange(min=1),
    help="Fewest updates that must count for a round to proceed (default 1).",
)
@click.option(
    "--waiting-memory-mb",
    type=click.IntRange(min=0),
    default=DEFAULT_WAITING_MEMORY // _MIB,
    show_default=True,
    help="MiB of updates that may wait in memory for an earlier node's; the rest wait on disk.",
)
@click.option(
    "--spill-dir",
    type=click.Path(exists=True, file_okay=False, writable=True, path_type=Path),
    help="Where updates wait on disk (default: --checkpoint-dir, else the temporary directory).",
)
@aggregation_options
@engine_options
@nodes_file_options
@observe_options
def run(
    config_path: Path | None,
    nodes: int | None,
    rounds: int | None,
    seed: int | None,
    checkpoint_dir: str | None,
    resume: bool,
    as_json: bool,
    trainer_spec: str | None,
    model_init_spec: str | None,
    evaluator_spec: str | None,
    min_nodes: int | None,
    waiting_memory_mb: int,
    spill_dir: Path | None,
    **options: Any,
) -> None:
    """Train with DiLoCo: simulated nodes (in process or on Ray), or real nodes (--nodes-file)."""
    from aumai_fedtrain.simulation import (
        SimulationProvider,
        builtin_evaluator,
        initial_model,
        simulated_nodes,
    )

    observe = {name: options.pop(name) for name in OBSERVE_OPTIONS}
    aggregation = {name: options.pop(name) for name in AGGREGATION_OPTIONS}
    compression = {name: options.pop(name) for name in COMPRESSION_OPTIONS}
    engine = {name: options.pop(name) for name in ENGINE_OPTIONS}
    network = options
    on_ray = check_engine_options(
        engine, nodes_file=network["nodes_file"] is not None, timeout=network["timeout"]
    )
    ray_timeout = network.pop("timeout") if on_ray else None
    network.setdefault("timeout", None)
    show_logs(observe["log_format"])
    if resume and checkpoint_dir is None:
        raise InputError("--resume needs --checkpoint-dir")
    if checkpoint_dir is not None and not checkpoint_dir.strip():
        raise InputError("--checkpoint-dir is empty: name a folder (e.g. --checkpoint-dir ./ckpt)")
    config = _load_config(config_path, {"num_nodes": nodes, "global_rounds": rounds, "seed": seed})
    config = with_aggregation(config, aggregation, simulated=network.get("nodes_file") is None)
    config = with_compression(config, compression)
    progress = RoundProgress(config.global_rounds, enabled=not as_json and is_terminal())
    if trainer_spec is None and network.get("nodes_file") is None:
        for option, spec in (("--model-init", model_init_spec), ("--evaluator", evaluator_spec)):
            if spec is not None:
                raise InputError(
                    f"{option} needs --trainer or --nodes-file (the built-in nodes train the "
                    "built-in model)"
                )
    if evaluator_spec is not None and trainer_spec is not None and model_init_spec is None:
        raise InputError("--evaluator needs a global model to evaluate: give --model-init too")
    if min_nodes is not None and network.get("nodes_file") is None and min_nodes > config.num_nodes:
        raise InputError(f"--min-nodes {min_nodes} exceeds the {config.num_nodes} nodes of the run")
    custom_model = model_init_spec is not None or trainer_spec is not None
    model_init = load_model_init(model_init_spec) if model_init_spec else None
    if model_init is None and not custom_model:
        model_init = initial_model
    evaluator = load_evaluator(evaluator_spec, config) if evaluator_spec else None
    if evaluator is None and not custom_model:
        evaluator = builtin_evaluator(config)
    http_run = prepare_http_run(
        config,
        nodes,
        min_nodes=min_nodes,
        model_init=model_init,
        evaluator=evaluator,
        on_node_done=progress.node_done,
        **network,
    )
    provider: UpdateProvider
    pool = None
    if http_run is not None:
        if trainer_spec is not None:
            raise InputError("--trainer cannot go with --nodes-file (each node runs its own)")
        config, node_list, provider = http_run
    else:
        node_list = simulated_nodes(config.num_nodes)
        factory = load_trainer_factory(trainer_spec) if trainer_spec is not None else None
        if on_ray:
            provider = pool = ray_provider(
                engine,
                factory=factory,
                model_init=model_init,
                evaluator=evaluator,
                timeout=ray_timeout,
                on_node_done=progress.node_done,
            )
        elif factory is None:
            provider = SimulationProvider(on_node_done=progress.node_done)
        else:
            provider = InProcessProvider(
                factory,
                model_init=model_init,
                evaluator=evaluator,
                on_node_done=progress.node_done,
            )
    provider = sampled(provider, engine, node_list, min_nodes)

    def starting(state: GlobalState) -> None:
        progress.start(state)
        if as_json:
            return
        resumed = f"  (resuming after round {state.round_id})" if state.round_id else ""
        click.echo(
            f"Starting federated training: {config.model_name}  "
            f"nodes={len(node_list)}  rounds={config.global_rounds}{resumed}"
        )

    coordinator = DiLoCoCoordinator(waiting_memory=waiting_memory_mb * _MIB, spill_dir=spill_dir)
    try:
        with (
            engine_session(engine, pool, quiet=as_json),
            run_observers(config, len(node_list), observe) as observers,
        ):
            callbacks: list[Callable[[RoundRecord], None]] = [progress, *observers]

            def on_round(record: RoundRecord) -> None:
                for callback in callbacks:
                    callback(record)

            result = coordinator.run_training(
                config,
                node_list,
                provider,
                checkpoint_dir=checkpoint_dir,
                resume=resume,
                on_round=on_round,
                on_start=starting,
                min_nodes=min_nodes or 1,
                metrics_file=observe["metrics_file"],
            )
    except (CheckpointError, MetricsFileError) as exc:
        raise InputError(str(exc)) from None
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(_result_summary(config, result), indent=2))
    else:
        _print_result(config, result)


_update_file_option = click.option(
    "--update",
    "update_path",
    required=True,
    type=click.Path(path_type=Path),
    help="LocalUpdate JSON file.",
)


@cli.command("hash")
@_update_file_option
def hash_command(update_path: Path) -> None:
    """Print the canonical SHA-256 of an update's gradients."""
    update = load_model_file(update_path, LocalUpdate, "update", InputError)
    click.echo(HashVerifier().compute_hash(update.gradients))


cli.add_command(node_command)
cli.add_command(report_command)
cli.add_command(status_command)
cli.add_command(export_command)


@cli.command()
@_update_file_option
@click.option("--hash", "expected", required=True, help="Expected SHA-256 hex digest.")
def verify(update_path: Path, expected: str) -> None:
    """Check an update's gradients against a SHA-256 digest (exit 1 on mismatch)."""
    try:
        normalize_digest(expected)
    except ValueError as exc:
        raise InputError(f"--hash: {exc}") from None
    update = load_model_file(update_path, LocalUpdate, "update", InputError)
    verifier = HashVerifier()
    actual = verifier.compute_hash(update.gradients)
    if verifier.verify(update, expected):
        click.echo(f"Verification PASSED.  Hash: {actual}")
        return
    click.echo(f"Verification FAILED.  Expected: {expected.strip().lower()}  Actual: {actual}")
    raise click.exceptions.Exit(1)


def _last_eval(result: Result) -> RoundRecord | None:
    evaluated = [record for record in result.history if record.eval_loss is not None]
    return evaluated[-1] if evaluated else None


def _result_summary(config: TrainingConfig, result: Result) -> dict[str, Any]:
    last = _last_eval(result)
    bytes_to, bytes_from = total_bytes(result.history)
    return {
        "model_name": config.model_name,
        "num_nodes": config.num_nodes,
        "global_rounds": config.global_rounds,
        "rounds_completed": result.rounds_completed,
        "total_samples": result.total_samples,
        "final_loss": result.final_loss,
        "eval_loss": last.eval_loss if last else None,
        "eval_accuracy": last.eval_accuracy if last else None,
        "duration_seconds": result.duration_seconds,
        "bytes_to_nodes": bytes_to,
        "bytes_from_nodes": bytes_from,
        "history": [record.model_dump(mode="json") for record in result.history],
        "credits": result.credits,
    }


def _print_result(config: TrainingConfig, result: Result) -> None:
    echo = click.echo
    echo()
    echo("Training complete.")
    echo(f"  Rounds completed:  {result.rounds_completed}/{config.global_rounds}")
    echo(f"  Total samples:     {result.total_samples}")
    echo(f"  Final avg loss:    {result.final_loss:.6f}")
    last = _last_eval(result)
    if last is not None and last.eval_loss is not None and last.eval_accuracy is not None:
        echo(f"  Eval loss:         {last.eval_loss:.6f}")
        echo(f"  Eval accuracy:     {last.eval_accuracy:.2%}")
    echo(f"  Duration:          {result.duration_seconds:.3f}s")
    bytes_to, bytes_from = total_bytes(result.history)
    if bytes_to is not None and bytes_from is not None:
        echo(f"  Bytes to nodes:    {bytes_to} ({bytes_to / 1024**2:.2f} MiB)")
        echo(f"  Bytes from nodes:  {bytes_from} ({bytes_from / 1024**2:.2f} MiB)")
    echo()
    echo("Node credits (samples processed):")
    credits = sorted(result.credits.items())
    for node_id, samples in credits[:MAX_CREDIT_LINES]:
        echo(f"  {node_id}: {samples} samples")
    if len(credits) > MAX_CREDIT_LINES:
        echo(f"  ... and {len(credits) - MAX_CREDIT_LINES} more nodes (--json lists all)")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``aumai-fedtrain`` command; errors are one line, never a traceback."""
    try:
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name=PROG_NAME,
            standalone_mode=False,
        )
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:  # a failing run: report it in one line, not a traceback
        fail(f"{type(exc).__name__}: {one_line(exc)}", 1)
    sys.exit(code if isinstance(code, int) else 0)
