"""The DiLoCo coordinator: verify, average, take the outer step, credit, checkpoint."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from aumai_fedtrain.aggregation import GradientAverager, weighted_mean_loss
from aumai_fedtrain.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from aumai_fedtrain.credits import CreditTracker
from aumai_fedtrain.models import (
    FederatedNode,
    GlobalState,
    LocalUpdate,
    RoundRecord,
    TensorMap,
    TrainingConfig,
    TrainingResult,
    to_tensor,
)
from aumai_fedtrain.outer import outer_step, zero_momentum
from aumai_fedtrain.providers.base import UpdateProvider

EMPTY_ROUND_MESSAGE = "No updates provided for aggregation."

RoundCallback = Callable[[RoundRecord], None]


class QuorumError(RuntimeError):
    """Fewer valid updates than the quorum (``min_nodes``) arrived for a round."""


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
    """

    def __init__(
        self,
        backend: str | None = None,
        credit_tracker: CreditTracker | None = None,
    ) -> None:
        self._backend = backend
        self._averager = GradientAverager(backend=backend)
        self.credit_tracker = credit_tracker if credit_tracker is not None else CreditTracker()
        self._config: TrainingConfig | None = None
        self._node_ids: frozenset[str] = frozenset()

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
        self._node_ids = frozenset(node.node_id for node in nodes)
        self._averager = GradientAverager(config.aggregation_weights, self._backend)
        if parameters is None:
            return GlobalState(round_id=0)
        params = {key: to_tensor(value).copy() for key, value in parameters.items()}
        return GlobalState(round_id=0, parameters=params, momentum=zero_momentum(params))

    def collect_updates(self, updates: Sequence[LocalUpdate]) -> TensorMap:
        """Average the updates' gradients per key (``ValueError`` when there are none)."""
        if not updates:
            raise ValueError(EMPTY_ROUND_MESSAGE)
        return self._averager.average(updates)

    def run_round(self, state: GlobalState, updates: Sequence[LocalUpdate]) -> GlobalState:
        """Check, average and apply one round of updates; credit the nodes.

        Raises ``ValueError`` naming the node for an update from an unknown node, a duplicate,
        a wrong ``round_id``, non-finite values or shapes that do not match the model. A
        rejected round changes nothing (no credit, no state).
        """
        config = self._require_config()
        self._check_updates(state, updates)
        delta = self.collect_updates(updates)
        parameters, momentum = state.parameters, state.momentum
        if parameters is not None:
            parameters, momentum = outer_step(
                parameters,
                momentum if momentum is not None else zero_momentum(parameters),
                delta,
                lr=config.outer_learning_rate,
                momentum_factor=config.outer_momentum,
                nesterov=config.nesterov,
            )
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
    ) -> TrainingResult:
        """Run up to ``config.global_rounds`` rounds with updates from ``provider``.

        Stops early when the provider returns no update. With ``checkpoint_dir`` the complete
        run state is written atomically after every round; ``resume=True`` continues from the
        last completed round found there (starting afresh when there is none yet).
        ``on_round`` is called with each round's :class:`RoundRecord`.
        """
        provider.configure(config)
        node_list = list(nodes)
        state = self.initialize(config, node_list, provider.initial_parameters(config))
        history: list[RoundRecord] = []
        elapsed_before = 0.0
        if checkpoint_dir is not None:
            restored = self._restore(Path(checkpoint_dir), config, node_list, resume)
            if restored is not None:
                state, history, elapsed_before = restored.state, restored.history, restored.elapsed
                try:
                    provider.load_state_dict(restored.provider_state)
                except (KeyError, ValueError) as exc:
                    raise CheckpointError(
                        f"the checkpoint in {checkpoint_dir} does not fit this provider ({exc})"
                    ) from None
        started = time.perf_counter()
        while state.round_id < config.global_rounds:
            round_started = time.perf_counter()
            updates = provider.get_updates(state.round_id + 1, state, node_list)
            if not updates:
                break
            state = self.run_round(state, updates)
            record = self._record(state, provider, time.perf_counter() - round_started)
            history.append(record)
            elapsed = elapsed_before + time.perf_counter() - started
            if checkpoint_dir is not None:
                save_checkpoint(
                    Path(checkpoint_dir),
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
            if on_round is not None:
                on_round(record)
        return TrainingResult(
            final_loss=history[-1].avg_loss if history else math.nan,
            total_samples=sum(record.total_samples for record in history),
            duration_seconds=elapsed_before + time.perf_counter() - started,
            rounds_completed=len(history),
            history=history,
            credits={node.node_id: 0 for node in node_list} | self.credit_tracker.all_credits(),
            final_state=state,
        )

    def _require_config(self) -> TrainingConfig:
        if self._config is None:
            raise RuntimeError("call initialize(config, nodes) before run_round")
        return self._config

    def _check_updates(self, state: GlobalState, updates: Sequence[LocalUpdate]) -> None:
        seen: set[str] = set()
        expected_round = state.round_id + 1
        for update in updates:
            node = update.node_id
            if node not in self._node_ids:
                raise ValueError(f"update from unknown node {node!r}")
            if node in seen:
                raise ValueError(f"duplicate update from node {node!r} in round {expected_round}")
            seen.add(node)
            if update.round_id != expected_round:
                raise ValueError(
                    f"update from node {node!r} is for round {update.round_id}, "
                    f"expected round {expected_round}"
                )
            for key, value in update.gradients.items():
                if not np.isfinite(value).all():
                    raise ValueError(
                        f"update from node {node!r}: gradient {key!r} has non-finite values"
                    )
            if state.parameters is not None:
                _check_matches_model(node, update.gradients, state.parameters)

    def _restore(
        self,
        directory: Path,
        config: TrainingConfig,
        nodes: list[FederatedNode],
        resume: bool,
    ) -> Checkpoint | None:
        checkpoint = load_checkpoint(directory)
        if checkpoint is None:
            return None
        if not resume:
            raise CheckpointError(
                f"{directory} already holds a checkpoint of round {checkpoint.state.round_id}; "
                "resume it or choose another checkpoint directory"
            )
        checkpoint.check_compatible(config, [node.node_id for node in nodes])
        self.credit_tracker.reset()
        for node_id, samples in checkpoint.credits.items():
            self.credit_tracker.record(node_id, samples)
        return checkpoint

    @staticmethod
    def _record(state: GlobalState, provider: UpdateProvider, duration: float) -> RoundRecord:
        evaluation = provider.evaluate(state.parameters) if state.parameters is not None else None
        assert state.avg_loss is not None
        return RoundRecord(
            round_id=state.round_id,
            avg_loss=state.avg_loss,
            total_samples=state.total_samples,
            num_participants=len(state.participating_nodes),
            duration_seconds=duration,
            eval_loss=evaluation[0] if evaluation else None,
            eval_accuracy=evaluation[1] if evaluation else None,
        )


def _check_matches_model(node: str, gradients: TensorMap, parameters: TensorMap) -> None:
    if gradients.keys() != parameters.keys():
        missing = sorted(parameters.keys() - gradients.keys())
        extra = sorted(gradients.keys() - parameters.keys())
        raise ValueError(
            f"update from node {node!r} does not match the model: "
            f"missing keys {missing}, unknown keys {extra}"
        )
    for key, value in gradients.items():
        if value.shape != parameters[key].shape:
            raise ValueError(
                f"update from node {node!r}: gradient {key!r} has shape "
                f"{value.shape}, the model's is {parameters[key].shape}"
            )
