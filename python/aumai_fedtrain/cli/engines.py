"""The engine options of ``run``: ``--engine``, the Ray actor pool and ``--sample-nodes``.

``aumai_fedtrain.cli`` decorates ``run`` with :func:`engine_options`; :func:`ray_provider` makes
the Ray engine's provider and :func:`engine_session` the Ray it runs on (an embedded local Ray,
shut down at the end, or the cluster at ``--ray-address``). Ray is imported only for
``--engine ray``, so the rest of the CLI runs without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from aumai_fedtrain.cli.errors import InputError
from aumai_fedtrain.models import FederatedNode
from aumai_fedtrain.providers import UpdateProvider
from aumai_fedtrain.providers.in_process import NodeProgress
from aumai_fedtrain.providers.sampling import SampledProvider
from aumai_fedtrain.trainer import Evaluator, ModelInit, TrainerFactory

__all__ = [
    "ENGINE_OPTIONS",
    "check_engine_options",
    "engine_options",
    "engine_session",
    "ray_provider",
    "sampled",
]

CommandT = TypeVar("CommandT", bound=Callable[..., Any])
ENGINES = ("in-process", "ray")
_RAY_OPTIONS = ("ray_address", "actors", "actor_cpus", "actor_gpus")
ENGINE_OPTIONS = ("engine", *_RAY_OPTIONS, "sample_nodes")
"""The keyword names :func:`engine_options` adds to the command."""


def engine_options(command: CommandT) -> CommandT:
    """Add ``--engine``, the Ray options and ``--sample-nodes`` to the ``run`` command."""
    options = [
        click.option(
            "--engine",
            type=click.Choice(ENGINES),
            default="in-process",
            show_default=True,
            help="Where simulated nodes train: this process, or a pool of Ray actors.",
        ),
        click.option(
            "--ray-address",
            help="Join the Ray cluster at ADDR (host:port of its head, or auto); default: start "
            "a local Ray for the run.",
        ),
        click.option(
            "--actors",
            type=click.IntRange(min=1),
            help="Ray actors hosting the nodes (default: the cluster's CPUs, at most one per "
            "node).",
        ),
        click.option(
            "--actor-cpus",
            type=click.FloatRange(min=0),
            help="CPUs each Ray actor asks for, fractions allowed (default 0.5).",
        ),
        click.option(
            "--actor-gpus",
            type=click.FloatRange(min=0),
            help="GPUs each Ray actor asks for, fractions allowed (default 0).",
        ),
        click.option(
            "--sample-nodes",
            type=click.IntRange(min=1),
            help="Train a seeded sample of this many nodes each round (default: all), on any "
            "engine.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def check_engine_options(
    engine: dict[str, Any], *, nodes_file: bool, timeout: float | None
) -> bool:
    """Whether the run is on Ray; :class:`InputError` for options that do not fit the engine."""
    on_ray = bool(engine["engine"] == "ray")
    if timeout is not None and not (on_ray or nodes_file):
        raise InputError("--timeout needs --nodes-file or --engine ray")
    if on_ray and nodes_file:
        raise InputError(
            "--engine ray cannot go with --nodes-file (real nodes train where they run)"
        )
    if not on_ray:
        for name in _RAY_OPTIONS:
            if engine[name] is not None:
                raise InputError(f"--{name.replace('_', '-')} needs --engine ray")
    return on_ray


def ray_provider(
    engine: dict[str, Any],
    *,
    factory: TrainerFactory | None,
    model_init: ModelInit | None,
    evaluator: Evaluator | None,
    timeout: float | None,
    on_node_done: NodeProgress,
) -> Any:
    """The Ray engine's ``RayProvider``: the built-in simulation, or ``factory``'s trainers."""
    ray_module = _import_ray_provider()
    pool: dict[str, Any] = {"actors": engine["actors"], "timeout": timeout}
    if engine["actor_cpus"] is not None:
        pool["actor_cpus"] = engine["actor_cpus"]
    if engine["actor_gpus"] is not None:
        pool["actor_gpus"] = engine["actor_gpus"]
    try:
        if factory is None:
            return ray_module.RaySimulationProvider(on_node_done=on_node_done, **pool)
        return ray_module.RayProvider(
            factory,
            model_init=model_init,
            evaluator=evaluator,
            on_node_done=on_node_done,
            **pool,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None


def sampled(
    provider: UpdateProvider,
    engine: dict[str, Any],
    nodes: list[FederatedNode],
    min_nodes: int | None,
) -> UpdateProvider:
    """``provider`` behind ``--sample-nodes`` (checked against the nodes and ``--min-nodes``)."""
    count: int | None = engine["sample_nodes"]
    if count is None:
        return provider
    if count > len(nodes):
        raise InputError(f"--sample-nodes {count} exceeds the {len(nodes)} nodes of the run")
    if min_nodes is not None and min_nodes > count:
        raise InputError(
            f"--min-nodes {min_nodes} exceeds the --sample-nodes {count} nodes of a round"
        )
    return SampledProvider(provider, count)


@contextlib.contextmanager
def engine_session(engine: dict[str, Any], pool: Any, quiet: bool = False) -> Iterator[None]:
    """The Ray the run needs during the block (none in process); ``pool``'s actors stop at the
    end, and an embedded Ray shuts down. ``quiet`` keeps Ray's and the workers' messages out
    of the output (``--json``)."""
    if engine["engine"] != "ray":
        yield
        return
    ray_module = _import_ray_provider()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                ray_module.ray_session(engine["ray_address"], log_to_driver=not quiet)
            )
        except ConnectionError as exc:
            raise InputError(str(exc)) from None
        stack.callback(pool.close)
        yield


def _import_ray_provider() -> Any:
    try:
        from aumai_fedtrain.providers import ray as ray_module
    except ImportError as exc:
        raise InputError(str(exc)) from None
    return ray_module
