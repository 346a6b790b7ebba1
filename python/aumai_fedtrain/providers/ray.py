"""``RayProvider``: virtual nodes hosted by a pool of Ray actors, from a laptop to a cluster.

Needs the ``ray`` extra (``pip install 'aumai-fedtrain[ray]'``); the rest of the package runs
without Ray.

How it works
------------
- **Actors.** ``actors`` Ray actors each run a
  :class:`~aumai_fedtrain.providers.hosting.TrainerHost` (the class the in-process engine
  uses too): the trainers of many nodes, made by the factory
  of the node-trainer interface on first use and kept across rounds with their data and inner
  optimizer state. Each actor asks Ray for ``actor_cpus`` CPUs (0.5 by default: two actors
  share a core, so a small machine never leaves an actor waiting forever for a whole free CPU,
  and the driver's aggregation still has room) and ``actor_gpus`` GPUs (fractional values
  share a GPU).
- **Placement.** A node is placed on an actor the first time it trains (or when a checkpoint
  restores its state) and stays there for the run: the nodes new in a round are dealt in
  node-id order to the actor holding the fewest nodes (the lowest index on ties). So with all
  ``N`` nodes in round 1, the ``i``-th node id in sorted order lives on actor ``i mod K``.
- **A round.** The global parameters go into Ray's object store once (``ray.put``); every
  actor gets the reference and the ids of its nodes in the round, in calls of at most
  :data:`CHUNK_NODES` nodes that it takes in order, trains them one after the other and
  answers each call with its nodes' updates, so updates reach the driver while the actor
  trains the next nodes. They are put back in node-list order, so the average (and so every
  number of the run) is the in-process engine's.
- **Checkpoints.** :meth:`RayProvider.state_dict` gathers the actors' trainer states under the
  in-process names (``node/<id>/<tensor>``), so a checkpoint written by one engine resumes on
  the other.
- **Faults.** An actor that dies in a round (its process killed, its machine lost) loses only
  its nodes whose answers had not reached the driver for that round: they are dropped with the
  reason, and the round completes when the coordinator's quorum (``min_nodes``) is met. The
  actor is replaced by a new one and its nodes' trainers (those that answered included) are
  restored from the state of the last checkpoint (:meth:`RayProvider.state_dict` keeps the
  state it returned; a run without checkpoints has none, and those nodes start afresh). With
  ``timeout`` (seconds, the round's deadline as on the HTTP engine), an actor that has not
  answered for all its nodes by then loses the rest for the round ("no answer within T s"),
  and is replaced the same way, so that no late training changes a node's state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import socket
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

try:
    import ray
    from ray.exceptions import RayError, RayTaskError
except ImportError as exc:  # the core runs without Ray
    raise ImportError("the Ray engine needs Ray: pip install 'aumai-fedtrain[ray]'") from exc

from aumai_fedtrain.models import (
    FederatedNode,
    GlobalState,
    TensorMap,
    TrainingConfig,
)
from aumai_fedtrain.providers.base import Arrivals
from aumai_fedtrain.providers.hosting import (
    HostedProvider,
    NodeOutcome,
    RoundOutcomes,
    TrainerHost,
    split_node_state,
)
from aumai_fedtrain.simulation import SimulationTrainer, SyntheticTask, builtin_evaluator
from aumai_fedtrain.simulation import initial_model as simulation_model
from aumai_fedtrain.trainer import TrainerFactory

__all__ = [
    "DEFAULT_ACTOR_CPUS",
    "RayProvider",
    "RaySimulationProvider",
    "SimulationFactory",
    "ray_session",
]

logger = logging.getLogger("aumai_fedtrain")

DEFAULT_ACTOR_CPUS = 0.5
"""CPUs each actor asks Ray for by default (see the module's documentation for why)."""

_MISSING_MODULE = re.compile(r"No module named ('[^']+')")
_RemoteHost: Any = None  # ray.remote(TrainerHost), made on first use


def _remote_host() -> Any:
    global _RemoteHost
    if _RemoteHost is None:
        _RemoteHost = ray.remote(TrainerHost)
    return _RemoteHost


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: float | None = None,
    object_store_mb: int | None = None,
    log_to_driver: bool = True,
) -> Iterator[None]:
    """Ray for the duration of the block: an embedded local Ray, or the cluster at ``address``.

    Without ``address`` a new local Ray is started (never an existing one; no dashboard;
    ``num_cpus`` and ``object_store_mb`` bound it, Ray's defaults otherwise) and shut down at
    the end; with
    ``address`` (``host:port`` of a head node, or ``auto``) the driver joins that cluster and
    leaves it at the end, the cluster keeps running (``auto`` joins whatever Ray runs on this
    machine, another run's embedded one included). A cluster that cannot be reached is a
    ``ConnectionError`` naming the address. ``log_to_driver=False`` keeps the workers' and
    Ray's own messages (a worker that died, say) out of this process's output, for output that
    must stay machine-readable.
    """
    if ray.is_initialized():
        raise RuntimeError("Ray is already running in this process: use it, or shut it down")
    if address is not None:
        _check_reachable(address)
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if address is None:
        options |= {"include_dashboard": False, "num_cpus": num_cpus}
        if object_store_mb is not None:
            options["object_store_memory"] = object_store_mb * 1024 * 1024
    try:
        ray.init(address=address if address is not None else "local", **options)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise ConnectionError(
            f"cannot connect to the Ray cluster at {address!r}: {message}; is it the head's "
            "host:port? A cluster with token authentication (Ray's default for a head started "
            "on this machine) needs RAY_AUTH_MODE=token and its token here (RAY_AUTH_TOKEN, or "
            "~/.ray/auth_token: `ray get-auth-token` on the head prints it)"
            if address is not None
            else f"cannot start a local Ray: {message}"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


class RayProvider(HostedProvider):
    """Runs every node's trainer on a pool of Ray actors (see the module's documentation).

    Ray must be running in this process (``ray.init()``, or :func:`ray_session`).

    Parameters
    ----------
    factory
        ``factory(node_id, config) -> NodeTrainer``, pickled to the actors: a module-level
        function or class (imported by name on the workers), or any picklable callable.
    hosted
        ``model_init``, ``evaluator`` (both run in the driver), ``keep_state`` and
        ``on_node_done`` (called as an actor answers), as for
        :class:`~aumai_fedtrain.providers.hosting.HostedProvider`.
    actors
        Number of actors (default: the Ray cluster's CPUs, at most the number of nodes).
    actor_cpus, actor_gpus
        Resources each actor asks Ray for; fractions share a CPU or GPU.
    actor_options
        Further ``ray.remote`` options of every actor (``resources``, ``memory``, ...).
    timeout
        The round's deadline in seconds, or None to wait for every live actor.
    start_timeout
        Seconds to wait for the actors to start before saying Ray cannot place them.
    """

    def __init__(
        self,
        factory: TrainerFactory,
        *,
        actors: int | None = None,
        actor_cpus: float = DEFAULT_ACTOR_CPUS,
        actor_gpus: float = 0.0,
        actor_options: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        start_timeout: float = 60.0,
        **hosted: Any,
    ) -> None:
        if actors is not None and actors < 1:
            raise ValueError(f"actors must be at least 1, got {actors}")
        if not (math.isfinite(actor_cpus) and actor_cpus >= 0):
            raise ValueError(f"actor_cpus must be a finite number >= 0, got {actor_cpus}")
        if not (math.isfinite(actor_gpus) and actor_gpus >= 0):
            raise ValueError(f"actor_gpus must be a finite number >= 0, got {actor_gpus}")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout}")
        super().__init__(factory, **hosted)
        self.actors = actors
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._options = {"num_cpus": actor_cpus, "num_gpus": actor_gpus, "max_restarts": 0}
        self._options |= dict(actor_options or {})
        self._pool: list[Any] = []
        self._placement: dict[str, int] = {}
        self._restoring: list[Any] = []
        self._checkpointed: dict[str, TensorMap] = {}

    # -- the pool ---------------------------------------------------------------------------

    def configure(self, config: TrainingConfig) -> None:
        """Start the actor pool for ``config`` (an earlier run's pool is stopped first)."""
        super().configure(config)
        if not ray.is_initialized():
            raise RuntimeError(
                "RayProvider needs a running Ray: call ray.init() (or use ray_session()) first"
            )
        self.close()
        self._checkpointed = {}
        count = self.actors
        if count is None:
            count = max(
                1, min(config.num_nodes, int(_resources(ray.cluster_resources).get("CPU", 1)))
            )
        self._check_fits(count)
        self._pool = [self._new_actor(config) for _ in range(count)]
        ready = [actor.ready.remote() for actor in self._pool]
        done, _ = ray.wait(ready, num_returns=len(ready), timeout=self.start_timeout)
        if len(done) < len(ready):
            asked = {key: self._options[key] for key in ("num_cpus", "num_gpus")}
            available = {
                key: _resources(ray.available_resources).get(key, 0) for key in ("CPU", "GPU")
            }
            self.close()
            raise RuntimeError(
                f"Ray placed {len(done)} of {count} actors within {self.start_timeout:g} s: each "
                f"asks for {asked}, the cluster has {available} free; ask for fewer actors or "
                "smaller resources per actor"
            )
        _get(done)  # an actor that failed to start (its factory cannot be unpickled, say)

    def _check_fits(self, count: int) -> None:
        """A ``RuntimeError`` at once when ``count`` actors ask for more CPUs or GPUs than the
        whole cluster has (they could never all be placed)."""
        total = _resources(ray.cluster_resources)
        for key, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            each = float(self._options.get(key) or 0)
            if count * each > total.get(resource, 0) + 1e-9:
                raise RuntimeError(
                    f"{count} actors asking for {each:g} {resource} each need {count * each:g}, "
                    f"and the Ray cluster has {total.get(resource, 0):g} in all: ask for fewer "
                    "actors or smaller resources per actor"
                )

    def close(self) -> None:
        """Stop the actors (their trainers' state is lost; checkpoints keep it)."""
        for actor in self._pool:
            ray.kill(actor, no_restart=True)
        self._pool = []
        self._placement.clear()
        self._restoring = []

    def __enter__(self) -> RayProvider:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def placement(self) -> dict[str, int]:
        """Node id -> index of the actor that hosts it (nodes that have not trained: none)."""
        return dict(self._placement)

    def actor(self, index: int) -> Any:
        """The Ray actor handle at ``index`` of the pool (for monitoring and fault tests)."""
        return self._pool[index]

    def _new_actor(self, config: TrainingConfig) -> Any:
        return _remote_host().options(**self._options).remote(self.factory, config, self.keep_state)

    def _place(self, node_ids: list[str]) -> None:
        load = [0] * len(self._pool)
        for index in self._placement.values():
            load[index] += 1
        for node_id in sorted(set(node_ids) - self._placement.keys()):
            index = min(range(len(load)), key=lambda i: (load[i], i))
            self._placement[node_id] = index
            load[index] += 1

    def _replace(self, index: int) -> None:
        """A new actor at ``index``, given its nodes' state of the last checkpoint at once."""
        ray.kill(self._pool[index], no_restart=True)
        actor = self._pool[index] = self._new_actor(self._require_config())
        states = {
            node_id: self._checkpointed[node_id]
            for node_id, placed in self._placement.items()
            if placed == index and node_id in self._checkpointed
        }
        if states:  # the actor runs its calls in order: this one before any training
            self._restoring.append(actor.load_states.remote(states))

    def _restored(self) -> None:
        """Wait for the restores of replaced actors (an error in one is raised here)."""
        calls, self._restoring = self._restoring, []
        _get(calls)

    # -- a round ------------------------------------------------------------------------------

    def _round(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> Iterator[Arrivals]:
        """Train ``nodes`` on their actors (the parameters put in the object store once), each
        actor's updates handed over as soon as it answers; the nodes of an actor that died or
        missed the deadline are silent, with why in :meth:`round_failures`."""
        if not self._pool:
            raise RuntimeError("call configure(config) before training")
        parameters = state.parameters if state.parameters is not None else {}
        node_ids = [node.node_id for node in nodes]
        self._place(node_ids)
        self._restored()
        groups: dict[int, list[str]] = {}
        for node_id in node_ids:
            groups.setdefault(self._placement[node_id], []).append(node_id)
        shared = ray.put(parameters)  # once per round; every actor reads the same object
        calls = {
            self._pool[index].train_many.remote(chunk, round_id, shared): (index, chunk)
            for index, ids in groups.items()
            for chunk in _chunks(ids)
        }
        answers = self._answers(round_id, calls, node_ids)
        yield from self._arrivals(round_id, parameters, node_ids, answers)

    def _answers(
        self, round_id: int, calls: dict[Any, tuple[int, list[str]]], node_ids: list[str]
    ) -> RoundOutcomes:
        """The actors' answers by the deadline, as each call comes: outcomes, and the nodes
        lost with why.

        ``calls`` maps each call to its actor's index and its nodes. A finished call is read
        (``ray.get``) once its first node is less than a round-robin row of calls
        (:data:`CHUNK_NODES` times the actors) past the first node not answered yet in
        node-list order: while a slow actor holds that node back, the answers of the fast ones
        wait in Ray's object store (which spills to disk), not in the driver's memory, where
        the coordinator could only buffer them. An actor that died or is late is replaced
        (:meth:`_replace`) once, and every node of its calls not yet read is lost for the round.
        """
        position = {node_id: index for index, node_id in enumerate(node_ids)}
        answered = [False] * len(node_ids)
        head = 0  # the first node (in node-list order) not answered yet
        row = CHUNK_NODES * max(1, len(self._pool))
        done = 0
        replaced: dict[int, str] = {}  # actor index -> why its unanswered nodes are lost
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pending = list(calls)
        finished: list[Any] = []  # calls that are done and not read yet

        def read(call: Any) -> RoundOutcomes:
            nonlocal done
            # Forgetting the reference lets Ray free the answer once its updates are folded.
            index, chunk = calls.pop(call)
            for node_id in chunk:
                answered[position[node_id]] = True
            try:
                answers: list[NodeOutcome] = ray.get(call)
            except RayTaskError as exc:  # the trainer raised: as in process, the run stops
                raise RuntimeError(_cause(exc)) from None
            except RayError as exc:  # the actor is gone (process killed, node lost)
                if index not in replaced:
                    replaced[index] = f"its Ray actor {index} died ({type(exc).__name__})"
                    logger.warning("round %d: Ray actor %d died; replacing it", round_id, index)
                    self._replace(index)
                yield {}, dict.fromkeys(chunk, replaced[index])
                return
            done += len(answers)
            if self.on_node_done is not None:
                self.on_node_done(done, len(node_ids))
            yield {answer.node_id: answer for answer in answers}, {}

        while pending or finished:
            near = [
                call for call in finished if not pending or position[calls[call][1][0]] < head + row
            ]
            if near:
                for call in near:
                    finished.remove(call)
                    yield from read(call)
                while head < len(answered) and answered[head]:
                    head += 1
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            finished.extend(ready)
        for call in finished:  # done by the deadline: they count
            yield from read(call)
        for call in pending:
            index, chunk = calls[call]
            if index not in replaced:
                replaced[index] = f"no answer within {self.timeout:g} s"
                self._replace(index)
            yield {}, dict.fromkeys(chunk, replaced[index])

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> TensorMap:
        """Every actor's kept trainer states, as ``node/<node_id>/<tensor>``.

        The state is also kept here: it restores the nodes of an actor that dies later.
        """
        if not self.keep_state:
            return {}
        self._restored()
        merged: TensorMap = {}
        for part in _get([actor.state_dict.remote() for actor in self._pool]):
            merged |= part
        self._checkpointed = split_node_state(merged)
        return merged

    def load_state_dict(self, state: TensorMap) -> None:
        """Put the trainers of :meth:`state_dict` on their actors (after :meth:`configure`)."""
        if not self.keep_state:
            super().load_state_dict(state)
            return
        per_node = split_node_state(state)
        self._place(list(per_node))
        calls = [actor.forget.remote() for actor in self._pool]
        for index, actor in enumerate(self._pool):
            mine = {
                node_id: node_state
                for node_id, node_state in per_node.items()
                if self._placement[node_id] == index
            }
            if mine:
                calls.append(actor.load_states.remote(mine))
        _get(calls)
        self._checkpointed = per_node

    def _require_config(self) -> TrainingConfig:
        if self.config is None:
            raise RuntimeError("call configure(config) before training")
        return self.config


class SimulationFactory:
    """A picklable factory of the built-in :class:`SimulationTrainer`: the trainers one process
    makes share one :class:`SyntheticTask` (a bounded cache of shards), as in process.

    Parameters
    ----------
    shard_cache_size
        How many node shards each process keeps between uses.
    """

    def __init__(self, shard_cache_size: int = 16) -> None:
        self.shard_cache_size = shard_cache_size
        self._task: SyntheticTask | None = None

    def __call__(self, node_id: str, config: TrainingConfig) -> SimulationTrainer:
        task = self._task
        if task is None or (task.config, task.seed) != (config.simulation, config.seed):
            task = SyntheticTask(config.simulation, config.seed, cache_size=self.shard_cache_size)
            self._task = task
        return SimulationTrainer(node_id, config, task=task)

    def __getstate__(self) -> dict[str, Any]:
        return {"shard_cache_size": self.shard_cache_size, "_task": None}


class RaySimulationProvider(RayProvider):
    """The built-in simulation (:class:`~aumai_fedtrain.simulation.SimulationProvider`) on Ray.

    The same virtual nodes, model and evaluation as in process, so the same numbers; every
    option of :class:`RayProvider` but the factory, the model and the evaluator applies.

    Parameters
    ----------
    keep_inner_state
        Keep each node's AdamW state across rounds (DiLoCo; the default).
    shard_cache_size
        How many node shards each actor keeps between uses.
    """

    def __init__(
        self, *, keep_inner_state: bool = True, shard_cache_size: int = 16, **options: Any
    ) -> None:
        super().__init__(
            SimulationFactory(shard_cache_size),
            model_init=simulation_model,
            keep_state=keep_inner_state,
            **options,
        )

    def configure(self, config: TrainingConfig) -> None:
        """Start the actors and build the held-out evaluation of ``config``'s task."""
        self.evaluator = builtin_evaluator(config)
        super().configure(config)


def _check_reachable(address: str, seconds: float = 5.0) -> None:
    """``ConnectionError`` when nothing answers at a ``host:port`` address within ``seconds``.

    (Ray itself retries an unreachable head for minutes.) Other forms (``auto``, ``ray://``)
    are left to Ray.
    """
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as exc:
        raise ConnectionError(
            f"cannot connect to the Ray cluster at {address!r} "
            f"({exc.strerror or type(exc).__name__}); start its head with `ray start --head` "
            "there, or give the head's address as host:port"
        ) from None


CHUNK_NODES = 64
"""The most nodes one call to an actor trains: an actor's nodes of a round go in several
calls, taken in order, so their updates reach the driver (and leave the object store) while
the actor trains the next ones."""


def _chunks(node_ids: list[str]) -> list[list[str]]:
    """``node_ids`` in consecutive calls: at least 8 when there are enough nodes, each of at
    most :data:`CHUNK_NODES`."""
    size = max(1, min(CHUNK_NODES, math.ceil(len(node_ids) / 8)))
    return [node_ids[start : start + size] for start in range(0, len(node_ids), size)]


def _cause(error: RayError) -> str:
    """The one-line message of what a Ray error wraps (a trainer's own error, say)."""
    cause = getattr(error, "cause", None)
    message = str(cause) if isinstance(cause, BaseException) else str(error)
    return " ".join(message.split()) or type(error).__name__


def _resources(query: Any) -> dict[str, float]:
    """``ray.cluster_resources()`` or ``ray.available_resources()`` (untyped in Ray)."""
    resources: dict[str, float] = query()
    return resources


def _get(calls: list[Any]) -> list[Any]:
    """``ray.get(calls)``, with an actor's error as one ``RuntimeError``."""
    try:
        return list(ray.get(calls))
    except RayError as exc:
        cause = _cause(exc)
        missing = _MISSING_MODULE.search(cause)
        if missing is not None:
            raise RuntimeError(
                f"a Ray actor cannot import {missing.group(1)}, which the trainer factory needs: "
                "install it on every Ray node (or, on one machine, run from its folder)"
            ) from None
        raise RuntimeError(f"a Ray actor failed: {cause}") from None
