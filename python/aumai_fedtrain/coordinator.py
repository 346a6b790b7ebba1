"""The DiLoCo coordinator: verify, average, take the outer step, credit, checkpoint."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aumai_fedtrain.aggregation import GradientAverager, weighted_mean_loss
from aumai_fedtrain.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_writable,
    checkpoint_lock,
    load_checkpoint,
    save_checkpoint,
)
from aumai_fedtrain.compression import EncodedUpdate
from aumai_fedtrain.credits import CreditTracker
from aumai_fedtrain.models import (
    MAX_LISTED_NODES,
    FederatedNode,
    GlobalState,
    LocalUpdate,
    NodeReputation,
    NodeTimes,
    RoundRecord,
    TensorMap,
    TrainingConfig,
    TrainingResult,
    to_tensor,
)
from aumai_fedtrain.observability.metrics_file import METRICS_FILE, MetricsFile
from aumai_fedtrain.outer import outer_dtype, outer_step, zero_momentum
from aumai_fedtrain.providers.base import Arrivals, RoundStats, UpdateProvider
from aumai_fedtrain.robust import Exclusions, RobustAggregator
from aumai_fedtrain.screening import RoundScreen, duplicates_reason, screen_updates
from aumai_fedtrain.spool import SpooledUpdate, SpoolError, UpdateSpool

logger = logging.getLogger("aumai_fedtrain")

EMPTY_ROUND_MESSAGE = "No updates provided for aggregation."

DEFAULT_WAITING_MEMORY = 256 * 1024 * 1024
"""Bytes of updates that may wait in memory for an earlier node (see ``waiting_memory``)."""

RoundCallback = Callable[[RoundRecord], None]
StartCallback = Callable[[GlobalState], None]


class QuorumError(RuntimeError):
    """Fewer valid updates than the quorum (``min_nodes``) arrived for a round."""


class DivergenceError(RuntimeError):
    """The outer step made the global model non-finite; the round was not applied."""


@dataclass(frozen=True)
class _Run:
    """What one :meth:`DiLoCoCoordinator.run_training` call trains with."""

    config: TrainingConfig
    nodes: list[FederatedNode]
    provider: UpdateProvider
    min_nodes: int
    on_round: RoundCallback | None
    on_start: StartCallback | None
    metrics_path: Path | None
    spill_dir: Path | None


class _Phases:
    """Seconds per phase of one round (see :data:`~aumai_fedtrain.models.PHASES`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started


class _Hold:
    """The :attr:`Arrivals.release` of a batch, called once every update of it is let go."""

    def __init__(self, release: Callable[[], None], count: int) -> None:
        self._release = release
        self._left = count
        if count == 0:
            release()

    def let_go(self) -> None:
        self._left -= 1
        if self._left == 0:
            self._release()


class _StreamedMean:
    """One round's weighted mean, folded as the updates arrive.

    Each batch is screened on arrival; an update that passes waits in a reorder buffer until
    every earlier node of the node list has sent its update or is known to send none, and
    the updates that are ready are then folded together, in node-list order, into the
    backend's running sum. So the mean, the nodes counted and the drops are what screening
    and averaging the whole round's list in node-list order give, while the coordinator holds
    the running sum and the waiting updates, never the round's updates at once. Waiting
    updates beyond ``waiting_memory`` bytes wait on disk in ``spool`` (the last in node order
    first), and their :class:`Arrivals` hold is released then. An
    :class:`~aumai_fedtrain.compression.EncodedUpdate` stays encoded throughout: screened
    from its codes and scales, held and spilled as them, and folded with the running sum's
    ``fold_encoded`` (dequantised inside the fold, bit for bit as its decoded values).
    """

    def __init__(
        self,
        screen: RoundScreen,
        nodes: Sequence[FederatedNode],
        averager: RobustAggregator,
        phases: _Phases,
        spool: UpdateSpool,
        waiting_memory: int,
    ) -> None:
        self._screen = screen
        self._averager = averager
        self._phases = phases
        self._sum = averager.running_sum()
        self._position = {node.node_id: index for index, node in enumerate(nodes)}
        self._settled = [False] * len(nodes)
        self._head = 0
        """Nodes before this position are folded or refused."""
        self._waiting: dict[int, tuple[LocalUpdate | SpooledUpdate, _Hold | None]] = {}
        self._spool = spool
        self._waiting_memory = waiting_memory
        self._waiting_bytes = 0
        """Bytes of the gradients of the waiting updates held in memory."""
        self._spill_failed = False
        self.spilled = (0, 0)
        """Updates moved to disk this round, and their gradients' bytes."""
        self._sent: Counter[str] = Counter()
        self._silent: set[str] = set()
        """Nodes the provider said send no update this round."""
        self._folded: set[str] = set()
        self._refused: dict[str, tuple[int, str]] = {}
        self.received = False
        self.counted: list[LocalUpdate] = []
        """The updates folded, in node-list order, without their gradients."""
        self.dropped: dict[str, str] = {}

    def add(self, arrival: Arrivals) -> None:
        """Screen ``arrival``'s updates, buffer those that pass and fold what is ready."""
        updates, arrival.updates = arrival.updates, []
        hold = _Hold(arrival.release, len(updates)) if arrival.release is not None else None
        self.received = self.received or bool(updates)
        with self._phases.timed("verify"):
            outcomes = self._screen.check(updates)
        for update, outcome in zip(updates, outcomes, strict=True):
            self._arrived(update, outcome, hold)
        del updates, outcomes
        for node_id in arrival.silent:
            self._silent.add(node_id)
            self._settle(node_id)
        self._fold_ready()
        self._spill_excess()

    def end(self, failures: dict[str, str]) -> None:
        """Fold every update still waiting; ``dropped`` becomes ``failures`` and the refusals
        (in node-list order, unknown nodes last)."""
        self._settled = [True] * len(self._settled)
        self._fold_ready()
        refused = sorted(self._refused.items(), key=lambda item: item[1][0])
        self.dropped = failures | {node_id: reason for node_id, (_, reason) in refused}

    def finish(self) -> TensorMap:
        """The mean of the updates counted."""
        return self._sum.finish()

    def _arrived(self, update: LocalUpdate, outcome: LocalUpdate | str, hold: _Hold | None) -> None:
        node_id = update.node_id
        self._sent[node_id] += 1
        position = self._position.get(node_id)
        if node_id in self._folded:
            raise RuntimeError(
                f"the provider handed over a second update of node {node_id!r} after its first "
                "was folded into the mean: iter_updates must yield one update per node"
            )
        if self._sent[node_id] > 1:
            if position is not None:
                self._discard(position)
            outcome = duplicates_reason(self._sent[node_id])
        elif node_id in self._silent:
            raise RuntimeError(
                f"the provider handed over an update of node {node_id!r} after saying it would "
                "send none this round"
            )
        if isinstance(outcome, str):
            order = position if position is not None else len(self._settled) + len(self._refused)
            self._refused[node_id] = (self._refused.get(node_id, (order, ""))[0], outcome)
            if hold is not None:
                hold.let_go()
        else:
            assert position is not None  # (screening refuses unknown nodes)
            self._waiting[position] = (outcome, hold)
            self._waiting_bytes += outcome.nbytes
        self._settle(node_id)

    def _discard(self, position: int) -> None:
        """Let go of the update waiting at ``position``, if any."""
        waiting = self._waiting.pop(position, None)
        if waiting is None:
            return
        update, hold = waiting
        if not isinstance(update, SpooledUpdate):  # (on disk, its space returns at close)
            self._waiting_bytes -= update.nbytes
        if hold is not None:
            hold.let_go()

    def _spill_excess(self) -> None:
        """Move waiting updates to disk, the last in node order first, until those left in
        memory take at most ``waiting_memory`` bytes. When the disk refuses, they stay in
        memory (said once per round)."""
        if self._waiting_bytes <= self._waiting_memory or self._spill_failed:
            return
        for position in sorted(self._waiting, reverse=True):
            update, hold = self._waiting[position]
            if isinstance(update, SpooledUpdate):
                continue
            try:
                with self._phases.timed("aggregate"):  # (the mean's own bookkeeping)
                    spooled = self._spool.put(update)
            except OSError as exc:
                self._spill_failed = True
                logger.warning(
                    "could not move a waiting update to disk (%s): the updates waiting for an "
                    "earlier node stay in memory this round; free space or choose another "
                    "directory (spill_dir, run --spill-dir)",
                    exc,
                    extra={"event": "spill_failed"},
                )
                return
            nbytes = update.nbytes
            self._waiting[position] = (spooled, None)
            self.spilled = (self.spilled[0] + 1, self.spilled[1] + nbytes)
            self._waiting_bytes -= nbytes
            if hold is not None:
                hold.let_go()
            if self._waiting_bytes <= self._waiting_memory:
                return

    def _settle(self, node_id: str) -> None:
        position = self._position.get(node_id)
        if position is not None:
            self._settled[position] = True

    def _fold_ready(self) -> None:
        """Fold the waiting updates that no earlier node holds back: those in memory in one
        call, each one read back from disk in its own (so that one at a time is read)."""
        ready: list[LocalUpdate] = []
        holds: list[_Hold] = []
        while self._head < len(self._settled) and self._settled[self._head]:
            waiting = self._waiting.pop(self._head, None)
            self._head += 1
            if waiting is None:
                continue
            waiting_update, hold = waiting
            if hold is not None:
                holds.append(hold)
            if isinstance(waiting_update, SpooledUpdate):
                self._fold(ready, holds)  # the earlier ones first, in node order
                ready, holds = [], []
                try:
                    with self._phases.timed("aggregate"):
                        update = self._spool.take(waiting_update)
                except SpoolError as exc:
                    # The coordinator's disk failed, not the node: said apart from the drops.
                    logger.warning(
                        "the update of node %s could not be read back from disk (%s): it does "
                        "not count this round; check the disk of the spill directory",
                        waiting_update.node_id,
                        exc,
                        extra={"event": "spill_failed", "node_id": waiting_update.node_id},
                    )
                    self._refused[waiting_update.node_id] = (
                        self._position[waiting_update.node_id],
                        str(exc),
                    )
                    continue
            else:
                update = waiting_update
                self._waiting_bytes -= update.nbytes
            with self._phases.timed("verify"):
                reason = self._screen.shape_conflict(update)
            if reason is not None:
                self._refused[update.node_id] = (self._position[update.node_id], reason)
                continue
            ready.append(update)
        self._fold(ready, holds)

    def _fold(self, ready: list[LocalUpdate], holds: list[_Hold]) -> None:
        """Fold ``ready`` (in node order) into the sum, then let go of ``holds``: each run of
        plain updates with ``fold``, each run of encoded ones with ``fold_encoded``."""
        if ready:
            weighted = zip(ready, self._averager.weights(ready), strict=True)
            with self._phases.timed("aggregate"):
                for encoded, group in itertools.groupby(
                    weighted, key=lambda pair: isinstance(pair[0], EncodedUpdate)
                ):
                    run, weights = zip(*group, strict=True)
                    labels = [update.node_id for update in run]
                    if encoded:
                        codes = [u.encoded for u in run if isinstance(u, EncodedUpdate)]
                        self._sum.fold_encoded(codes, list(weights), labels)
                    else:
                        values = [update.gradients for update in run]
                        self._sum.fold(values, list(weights), labels)
            self._folded.update(update.node_id for update in ready)
            self.counted.extend(update.without_tensors() for update in ready)
        ready.clear()
        for hold in holds:
            hold.let_go()


_END = object()
"""What ``next`` gives at the end of a provider's arrivals."""


def check_unique_node_ids(nodes: Sequence[FederatedNode]) -> None:
    """Raise ``ValueError`` naming the first node id that appears twice."""
    seen: set[str] = set()
    for node in nodes:
        if node.node_id in seen:
            raise ValueError(f"duplicate node id {node.node_id!r}")
        seen.add(node.node_id)


class DiLoCoCoordinator:
    """Runs DiLoCo rounds: averages pseudo-gradients and applies the outer optimizer.

    Parameters
    ----------
    backend
        Hot-path backend for averaging: ``"native"``, ``"python"`` or None for the default.
    credit_tracker
        Where node credits accumulate; a fresh tracker by default.
    waiting_memory
        Bytes of updates that may wait in memory, in a streamed mean, for an earlier node's
        update (:data:`DEFAULT_WAITING_MEMORY`); beyond it they wait on disk, so the
        coordinator holds the running sum, the answers in flight and at most this much.
    spill_dir
        An existing directory where those updates wait, in one file per round that is
        unlinked as soon as it is made (nothing is left behind, even by a killed run): the
        checkpoint directory by default, else the system's temporary directory. Choose a
        disk, not a ``tmpfs`` (which is memory).
    """

    def __init__(
        self,
        backend: str | None = None,
        credit_tracker: CreditTracker | None = None,
        *,
        waiting_memory: int = DEFAULT_WAITING_MEMORY,
        spill_dir: str | Path | None = None,
    ) -> None:
        if waiting_memory < 0:
            raise ValueError(f"waiting_memory must be >= 0 bytes, got {waiting_memory}")
        self.waiting_memory = waiting_memory
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._backend = backend
        self._averager: GradientAverager | RobustAggregator = GradientAverager(backend=backend)
        self.credit_tracker = credit_tracker if credit_tracker is not None else CreditTracker()
        self._config: TrainingConfig | None = None
        self._nodes: dict[str, FederatedNode] = {}

    def initialize(
        self,
        config: TrainingConfig,
        nodes: Sequence[FederatedNode],
        parameters: TensorMap | None = None,
    ) -> GlobalState:
        """Start a run: remember the config and nodes, and return the round-0 state.

        ``parameters`` are the initial global model; without them the coordinator only averages
        updates (``global_weights``) and takes no outer step.
        """
        if not nodes:
            raise ValueError("a run needs at least one node")
        check_unique_node_ids(nodes)
        self._config = config
        self._nodes = {node.node_id: node for node in nodes}
        self._averager = RobustAggregator(config, self._backend, num_nodes=len(nodes))
        if parameters is None:
            return GlobalState(round_id=0)
        params = _initial_parameters(parameters)
        return GlobalState(round_id=0, parameters=params, momentum=zero_momentum(params))

    def collect_updates(
        self,
        updates: Sequence[LocalUpdate],
        previous: TensorMap | None = None,
        median: TensorMap | None = None,
    ) -> TensorMap:
        """Aggregate the updates' gradients per key (``ValueError`` when there are none);
        ``previous`` is the previous round's aggregate, which ``clip_start="previous"`` starts
        from; ``median``, when given, the updates' coordinate-wise median, which the median
        rule and CenteredClip then take instead of computing it again."""
        if not updates:
            raise ValueError(EMPTY_ROUND_MESSAGE)
        if isinstance(self._averager, RobustAggregator):
            return self._averager.average(updates, previous, median)
        return self._averager.average(updates)

    def screen(
        self, state: GlobalState, updates: Sequence[LocalUpdate]
    ) -> tuple[list[LocalUpdate], dict[str, str]]:
        """Split ``updates`` into those that count and ``{node_id: reason}`` for the rest.

        See :mod:`aumai_fedtrain.screening` for what is checked.
        """
        return screen_updates(
            updates,
            self._nodes,
            expected_round=state.round_id + 1,
            parameters=state.parameters,
            config=self._require_config(),
        )

    def run_round(self, state: GlobalState, updates: Sequence[LocalUpdate]) -> GlobalState:
        """Check, average and apply one round of updates; credit the nodes.

        Raises ``ValueError`` naming the node for an update that does not pass screening (an
        unknown node, a duplicate, a wrong ``round_id``, non-finite or out-of-bounds values,
        shapes that do not match the model, implausible samples), and
        :class:`DivergenceError` when the outer step would make the model non-finite. A
        rejected round changes nothing (no credit, no state). A robust rule's outlier filters
        (:func:`aumai_fedtrain.robust.exclude_outliers`) may exclude updates: they are logged
        with their reasons, left out of ``participating_nodes`` and not credited.
        """
        accepted, dropped = self.screen(state, updates)
        if dropped:
            node, reason = next(iter(dropped.items()))
            raise ValueError(f"update from node {node!r}: {reason}")
        exclusions = self._exclude(state, accepted)
        if exclusions.excluded:
            logger.warning(
                "round %d: %d of %d updates excluded (%s)",
                state.round_id + 1,
                len(exclusions.excluded),
                len(accepted),
                _describe_drops(exclusions.excluded),
                extra={
                    "event": "dropped",
                    "round_id": state.round_id + 1,
                    "dropped": exclusions.excluded,
                },
            )
        return self._apply(state, exclusions.kept, exclusions=exclusions)

    def _exclude(self, state: GlobalState, updates: Sequence[LocalUpdate]) -> Exclusions:
        """The robust rule's outlier filters over screened ``updates`` (nothing excluded by the
        mean); a warning names the flagged nodes kept because a majority is never excluded."""
        if not isinstance(self._averager, RobustAggregator):
            return Exclusions(list(updates), {}, dict(state.reputation))
        exclusions = self._averager.exclude(updates, state.global_weights, state.reputation)
        if exclusions.spared:
            logger.warning(
                "round %d: robust aggregation flagged %d of %d updates but never excludes a "
                "majority: it excludes the %d most extreme and keeps %s",
                state.round_id + 1,
                len(exclusions.excluded) + len(exclusions.spared),
                len(updates),
                len(exclusions.excluded),
                ", ".join(exclusions.spared),
                extra={"event": "spared", "round_id": state.round_id + 1},
            )
        return exclusions

    def _apply(
        self,
        state: GlobalState,
        updates: Sequence[LocalUpdate],
        phases: _Phases | None = None,
        exclusions: Exclusions | None = None,
    ) -> GlobalState:
        """Average screened ``updates``, take the outer step, check it and credit the nodes;
        ``exclusions`` (the outlier filters' decisions that left ``updates``) give the next
        state's reputation (None: ``state``'s) and the median of ``updates`` when known."""
        phases = phases if phases is not None else _Phases()
        reputation = median = None
        if exclusions is not None:
            reputation, median = exclusions.reputation, exclusions.median
        with phases.timed("aggregate"):
            delta = self.collect_updates(updates, state.global_weights, median)
        return self._step(state, delta, updates, phases, reputation)

    def _step(
        self,
        state: GlobalState,
        delta: TensorMap,
        updates: Sequence[LocalUpdate],
        phases: _Phases,
        reputation: dict[str, NodeReputation] | None = None,
    ) -> GlobalState:
        """Take the outer step with the aggregate ``delta`` of ``updates`` (their gradients
        are not read), check it and credit the nodes; ``reputation`` is the next state's
        (None: ``state``'s)."""
        config = self._require_config()
        parameters, momentum = state.parameters, state.momentum
        if parameters is not None:
            with phases.timed("outer_step"), np.errstate(over="ignore", invalid="ignore"):
                parameters, momentum = outer_step(
                    parameters,
                    momentum if momentum is not None else zero_momentum(parameters),
                    delta,
                    lr=config.outer_learning_rate,
                    momentum_factor=config.outer_momentum,
                    nesterov=config.nesterov,
                )
            _check_outer_step(state.round_id + 1, config, parameters, momentum)
        for update in updates:
            self.credit_tracker.record(update.node_id, update.samples_used)
        return GlobalState(
            round_id=state.round_id + 1,
            global_weights=delta,
            participating_nodes=[update.node_id for update in updates],
            avg_loss=weighted_mean_loss(updates),
            total_samples=sum(update.samples_used for update in updates),
            parameters=parameters,
            momentum=momentum,
            reputation=state.reputation if reputation is None else reputation,
        )

    def run_training(
        self,
        config: TrainingConfig,
        nodes: Sequence[FederatedNode],
        provider: UpdateProvider,
        *,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        on_round: RoundCallback | None = None,
        on_start: StartCallback | None = None,
        min_nodes: int = 1,
        metrics_file: str | Path | None = None,
    ) -> TrainingResult:
        """Run up to ``config.global_rounds`` rounds with updates from ``provider``.

        Every update is screened (:meth:`screen`); a node whose update does not count is
        dropped for the round with its reason (logged on the ``aumai_fedtrain`` logger and kept
        in :attr:`RoundRecord.dropped`; so is an update a robust rule's outlier filters
        exclude), and the round goes on when at least ``min_nodes``
        updates count, else :class:`QuorumError` ends the run with the last checkpoint intact.
        Stops early when the provider returns no update and reports no failure. With
        ``checkpoint_dir`` the complete run state is written atomically after every round;
        ``resume=True`` continues from the last completed round found there (starting afresh
        when there is none yet); nodes may differ from the checkpointed run's (a node added
        starts from the global model, a removed node keeps its credits). ``on_start`` is called
        with the starting state once the run is ready to train, ``on_round`` with each round's
        :class:`RoundRecord`.

        Each round's record is also appended to ``metrics_file`` (by default ``metrics.jsonl``
        in ``checkpoint_dir``; none without either), reconciled with the checkpoint on resume
        (see :mod:`aumai_fedtrain.observability.metrics_file`).
        """
        if not 1 <= min_nodes <= len(nodes):
            raise ValueError(
                f"min_nodes must be between 1 and the {len(nodes)} nodes, got {min_nodes}"
            )
        if config.num_nodes != len(nodes):
            raise ValueError(
                f"config.num_nodes is {config.num_nodes} but {len(nodes)} nodes were given; "
                "make them agree"
            )
        provider.configure(config)
        metrics_path = Path(metrics_file) if metrics_file is not None else None
        if metrics_path is None and checkpoint_dir is not None:
            metrics_path = Path(checkpoint_dir) / METRICS_FILE
        spill_dir = self.spill_dir
        if spill_dir is not None and not (spill_dir.is_dir() and os.access(spill_dir, os.W_OK)):
            raise ValueError(f"spill_dir {str(spill_dir)!r} is not a writable directory")
        if spill_dir is None and checkpoint_dir is not None:
            spill_dir = Path(checkpoint_dir)
        run = _Run(
            config, list(nodes), provider, min_nodes, on_round, on_start, metrics_path, spill_dir
        )
        if checkpoint_dir is None:
            return self._train(run, None, resume)
        directory = Path(checkpoint_dir)
        check_writable(directory)
        with checkpoint_lock(directory):
            return self._train(run, directory, resume)

    def _train(self, run: _Run, directory: Path | None, resume: bool) -> TrainingResult:
        """The rounds of :meth:`run_training` (holding the checkpoint directory's lock)."""
        config, node_list, provider = run.config, run.nodes, run.provider
        state = self.initialize(config, node_list, provider.initial_parameters(config))
        history: list[RoundRecord] = []
        elapsed_before = 0.0
        if directory is not None:
            restored = self._restore(directory, config, resume, state)
            if restored is not None:
                state, history, elapsed_before = restored.state, restored.history, restored.elapsed
                try:
                    provider.load_state_dict(restored.provider_state)
                except (KeyError, ValueError) as exc:
                    raise CheckpointError(
                        f"the checkpoint in {directory} does not fit this provider ({exc})"
                    ) from None
        with contextlib.ExitStack() as stack:
            metrics = None
            if run.metrics_path is not None:
                metrics = stack.enter_context(
                    MetricsFile(run.metrics_path, state.round_id, history)
                )
            if run.on_start is not None:
                run.on_start(state)
            started = time.perf_counter()
            while state.round_id < config.global_rounds:
                outcome = self._round(run, state)
                if outcome is None:
                    break
                state, record = outcome
                history.append(record)
                elapsed = elapsed_before + time.perf_counter() - started
                if directory is not None:
                    checkpoint_started = time.perf_counter()
                    save_checkpoint(
                        directory,
                        Checkpoint(
                            config=config,
                            node_ids=[node.node_id for node in node_list],
                            state=state,
                            credits=self.credit_tracker.all_credits(),
                            history=history,
                            elapsed=elapsed,
                            provider_state=provider.state_dict(),
                        ),
                    )
                    record = record.model_copy(
                        update={
                            "phase_seconds": record.phase_seconds
                            | {"checkpoint": time.perf_counter() - checkpoint_started}
                        }
                    )
                if metrics is not None:
                    metrics.append(record)
                if logger.isEnabledFor(logging.INFO):
                    logger.info(
                        "round %d done: loss %.6f, %d of %d nodes counted",
                        record.round_id,
                        record.avg_loss,
                        record.num_participants,
                        len(node_list),
                        extra={"event": "round", "record": record.model_dump(mode="json")},
                    )
                if run.on_round is not None:
                    run.on_round(record)
        return TrainingResult(
            final_loss=history[-1].avg_loss if history else math.nan,
            total_samples=sum(record.total_samples for record in history),
            duration_seconds=elapsed_before + time.perf_counter() - started,
            rounds_completed=len(history),
            history=history,
            credits={node.node_id: 0 for node in node_list} | self.credit_tracker.all_credits(),
            final_state=state,
        )

    def _round(self, run: _Run, state: GlobalState) -> tuple[GlobalState, RoundRecord] | None:
        """Train, screen, apply and evaluate one round; None when the provider has nothing."""
        provider, node_list = run.provider, run.nodes
        round_started = time.perf_counter()
        round_id = state.round_id + 1
        phases = _Phases()
        stream: _StreamedMean | None = None
        exclusions: Exclusions | None = None
        if isinstance(self._averager, RobustAggregator) and self._averager.streams:
            stream = self._stream(run, state, phases)
            received, accepted, dropped = stream.received, stream.counted, stream.dropped
        else:
            with phases.timed("collect"):
                updates = provider.get_updates(round_id, state, node_list)
                dropped = provider.round_failures(round_id)
            received = bool(updates)
            if received:
                with phases.timed("verify"):
                    accepted, refused = self.screen(state, updates)
                dropped |= refused
                with phases.timed("aggregate"):
                    exclusions = self._exclude(state, accepted)
                accepted = exclusions.kept
                dropped |= exclusions.excluded
        if not received and not dropped:
            return None
        _check_quorum(round_id, len(accepted), len(node_list), run.min_nodes, dropped)
        if dropped:
            logger.warning(
                "round %d: %d of %d nodes dropped (%s)",
                round_id,
                len(dropped),
                len(node_list),
                _describe_drops(dropped),
                extra={"event": "dropped", "round_id": round_id, "dropped": dropped},
            )
        if stream is None:
            state = self._apply(state, accepted, phases, exclusions)
        else:
            with phases.timed("aggregate"):
                delta = stream.finish()
            state = self._step(state, delta, accepted, phases)
        with phases.timed("evaluate"):
            evaluation = self._evaluate_global(state, provider)
        record = _round_record(
            state,
            len(node_list),
            dropped,
            evaluation,
            provider.round_stats(round_id),
            duration=time.perf_counter() - round_started,
            phases=phases.seconds,
        )
        return state, record

    def _stream(self, run: _Run, state: GlobalState, phases: _Phases) -> _StreamedMean:
        """Collect the round's updates from ``run.provider.iter_updates``, screening each
        batch as it arrives and folding the updates into the mean in node-list order."""
        assert isinstance(self._averager, RobustAggregator)
        round_id = state.round_id + 1
        screen = RoundScreen(
            self._nodes,
            expected_round=round_id,
            parameters=state.parameters,
            config=self._require_config(),
        )
        with contextlib.closing(UpdateSpool(run.spill_dir)) as spool:
            stream = _StreamedMean(
                screen, run.nodes, self._averager, phases, spool, self.waiting_memory
            )
            arrivals: Iterator[object] = iter(run.provider.iter_updates(round_id, state, run.nodes))
            try:
                while True:
                    with phases.timed("collect"):
                        arrival = next(arrivals, _END)
                    if arrival is _END:
                        break
                    if not isinstance(arrival, Arrivals):
                        raise TypeError(
                            f"{type(run.provider).__name__}.iter_updates yielded "
                            f"{type(arrival).__name__}, expected Arrivals"
                        )
                    stream.add(arrival)
                    del arrival  # (its updates are the stream's now)
            finally:
                # On an error, a provider's generator stops asking its nodes now, not whenever
                # it happens to be collected.
                close = getattr(arrivals, "close", None)
                if close is not None:
                    close()
            with phases.timed("collect"):
                failures = run.provider.round_failures(round_id)
            stream.end(failures)
        count, nbytes = stream.spilled
        if count:
            logger.info(
                "round %d: %d updates waited on disk for an earlier node (%.1f MiB beyond "
                "waiting_memory)",
                round_id,
                count,
                nbytes / (1024 * 1024),
                extra={"event": "spilled", "round_id": round_id, "updates": count},
            )
        return stream

    def _require_config(self) -> TrainingConfig:
        if self._config is None:
            raise RuntimeError("call initialize(config, nodes) before run_round")
        return self._config

    def _restore(
        self, directory: Path, config: TrainingConfig, resume: bool, start: GlobalState
    ) -> Checkpoint | None:
        """The checkpoint in ``directory`` to resume from (checked against ``start``), or None."""
        checkpoint = load_checkpoint(directory)
        if checkpoint is None:
            return None
        if not resume:
            raise CheckpointError(
                f"{directory} already holds a checkpoint of round {checkpoint.state.round_id}; "
                "resume it or choose another checkpoint directory"
            )
        checkpoint.check_compatible(config)
        problem = _inconsistency(checkpoint, start)
        if problem is not None:
            raise CheckpointError(f"the checkpoint in {directory} cannot be resumed: {problem}")
        self.credit_tracker.reset()
        for node_id, samples in checkpoint.credits.items():
            self.credit_tracker.record(node_id, samples)
        return checkpoint

    def _evaluate_global(
        self, state: GlobalState, provider: UpdateProvider
    ) -> tuple[float, float] | None:
        """The provider's evaluation of the new global model; :class:`DivergenceError` when
        its loss is not finite."""
        if state.parameters is None:
            return None
        evaluation = _evaluate(provider, state.parameters, state.round_id)
        if evaluation is not None and not math.isfinite(evaluation[0]):
            raise DivergenceError(
                f"round {state.round_id}: the global model's eval loss is {evaluation[0]}: "
                f"{_outer_advice(self._require_config())} (or the evaluator is wrong)"
            )
        return evaluation


def _round_record(
    state: GlobalState,
    num_nodes: int,
    dropped: dict[str, str],
    evaluation: tuple[float, float] | None,
    stats: RoundStats | None,
    *,
    duration: float,
    phases: dict[str, float],
) -> RoundRecord:
    """The round's :class:`RoundRecord` (nodes listed by id up to ``MAX_LISTED_NODES``)."""
    assert state.avg_loss is not None
    listed = num_nodes <= MAX_LISTED_NODES
    return RoundRecord(
        round_id=state.round_id,
        avg_loss=state.avg_loss,
        total_samples=state.total_samples,
        num_participants=len(state.participating_nodes),
        duration_seconds=duration,
        eval_loss=evaluation[0] if evaluation else None,
        eval_accuracy=evaluation[1] if evaluation else None,
        dropped=dropped,
        benched=list(stats.benched) if stats is not None else [],
        participants=list(state.participating_nodes) if listed else [],
        num_nodes=num_nodes,
        bytes_to_nodes=stats.bytes_to_nodes if stats is not None else None,
        bytes_from_nodes=stats.bytes_from_nodes if stats is not None else None,
        node_times=_node_times(stats, listed) if stats is not None else None,
        phase_seconds=phases,
    )


def _node_times(stats: RoundStats, listed: bool) -> NodeTimes | None:
    if not stats.node_seconds:
        return None
    seconds = np.fromiter(stats.node_seconds.values(), dtype=np.float64)
    p50, p90 = np.percentile(seconds, [50, 90])
    return NodeTimes(
        kind=stats.time_kind,
        p50=float(p50),
        p90=float(p90),
        max=float(seconds.max()),
        per_node=dict(stats.node_seconds) if listed else {},
    )


def _inconsistency(checkpoint: Checkpoint, start: GlobalState) -> str | None:
    """What makes ``checkpoint`` unfit to continue a run that would start at ``start``."""
    state = checkpoint.state
    if [record.round_id for record in checkpoint.history] != list(range(1, state.round_id + 1)):
        return f"its history does not list rounds 1 to {state.round_id}"
    if len(set(checkpoint.node_ids)) != len(checkpoint.node_ids):
        return "it lists a node twice"
    if (state.parameters is None) != (start.parameters is None):
        return "it was written by a run with a global model and this one has none, or vice versa"
    for name, saved in (("parameters", state.parameters), ("momentum", state.momentum)):
        if saved is None or start.parameters is None:
            continue
        shapes = {key: value.shape for key, value in saved.items()}
        if shapes != {key: value.shape for key, value in start.parameters.items()}:
            return f"its {name} do not have the keys and shapes of this run's model"
        for key, value in start.parameters.items():
            if saved[key].dtype != value.dtype:
                return (
                    f"its {name} {key!r} are {saved[key].dtype}, this run's model keeps "
                    f"{value.dtype}"
                )
        if not all(np.isfinite(value).all() for value in saved.values()):
            return f"its {name} hold non-finite values"
    return None


def _initial_parameters(parameters: TensorMap) -> TensorMap:
    """Own, checked copies of the initial model in its outer dtype (float64 stays float64,
    float32 float32, float16 becomes float32: :func:`~aumai_fedtrain.outer.outer_dtype`);
    ``ValueError`` naming a bad parameter."""
    if not isinstance(parameters, Mapping):
        raise ValueError(
            f"the initial model must be a mapping name -> array, got {type(parameters).__name__}"
        )
    checked: TensorMap = {}
    for key, value in parameters.items():
        if not isinstance(key, str):
            raise ValueError(f"the initial model has a parameter name that is not a str: {key!r}")
        try:
            tensor = to_tensor(value)
            tensor = tensor.astype(outer_dtype(tensor.dtype), copy=True)
        except ValueError as exc:
            raise ValueError(f"the initial model's parameter {key!r} {exc}") from None
        if not np.isfinite(tensor).all():
            raise ValueError(f"the initial model's parameter {key!r} has non-finite values")
        checked[key] = tensor
    return checked


def _evaluate(
    provider: UpdateProvider, parameters: TensorMap, round_id: int
) -> tuple[float, float] | None:
    """The provider's ``(loss, accuracy)`` of the global model, checked, or None."""
    try:
        with np.errstate(all="ignore"):
            result = provider.evaluate(parameters)
    except Exception as exc:
        raise RuntimeError(
            f"round {round_id}: the evaluator failed: {type(exc).__name__}: {exc}"
        ) from exc
    if result is None:
        return None
    try:
        loss, accuracy = (float(value) for value in result)
    except (TypeError, ValueError):
        raise RuntimeError(
            f"round {round_id}: the evaluator returned {result!r}, expected (loss, accuracy)"
        ) from None
    return loss, accuracy


def _outer_advice(config: TrainingConfig) -> str:
    return (
        "the outer optimizer diverged; lower outer_learning_rate "
        f"(now {config.outer_learning_rate:g}) or outer_momentum (now {config.outer_momentum:g})"
    )


def _check_outer_step(
    round_id: int, config: TrainingConfig, parameters: TensorMap, momentum: TensorMap
) -> None:
    """Raise :class:`DivergenceError` when the outer step left a non-finite value."""
    for group, tensors in (("parameter", parameters), ("momentum of", momentum)):
        for key, value in tensors.items():
            if not np.isfinite(value).all():
                raise DivergenceError(
                    f"round {round_id}: the outer step made {group} {key!r} non-finite: "
                    f"{_outer_advice(config)}; the state and the last checkpoint are unchanged"
                )


def _describe_drops(dropped: dict[str, str], shown: int = 5) -> str:
    """``node: reason; ...`` for the first ``shown`` dropped nodes, and how many more."""
    text = "; ".join(f"{node}: {reason}" for node, reason in list(dropped.items())[:shown])
    if len(dropped) > shown:
        text += f"; and {len(dropped) - shown} more"
    return text


def _check_quorum(
    round_id: int, counted: int, total: int, min_nodes: int, dropped: dict[str, str]
) -> None:
    if counted >= min_nodes:
        return
    raise QuorumError(
        f"round {round_id}: {counted} of {total} nodes sent an update that counts, the quorum "
        f"is {min_nodes} ({_describe_drops(dropped)}); the state and the last checkpoint are "
        "unchanged"
    )
