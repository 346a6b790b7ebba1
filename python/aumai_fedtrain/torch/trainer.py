"""The DiLoCo node trainer for any ``nn.Module``: :class:`TorchTrainer`.

A node's round: load the global parameters into the node's model, take ``config.local_steps``
inner steps (a mini-batch from the node's data, ``loss(model, batch)``, backward, an inner
optimizer step; AdamW with ``lr = config.learning_rate`` by default) and return the
pseudo-gradient ``global - trained`` of every ``state_dict`` entry, the mean loss and the samples
processed. The inner optimizer's state, the position in the data and (with the default
``buffers="local"``) the node's own buffers stay with the trainer across rounds and are its
:meth:`TorchTrainer.state_dict`, so checkpoints and ``aumai-fedtrain node --state-dir`` carry
them.

Randomness inside a round (dropout, a ``DataLoader`` drawing from torch's global generator) is
seeded from ``(config.seed, node_id, round_id)`` and the caller's generator state is restored
afterwards, so a round is a function of its inputs. The initial model is built under the seed
``config.seed`` (:func:`build_model`), so every node and the coordinator start from the same one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from aumai_fedtrain.models import TensorMap, TrainingConfig
from aumai_fedtrain.torch.convert import (
    check_matches,
    exchange_dtype,
    load_tensormap,
    state_dict_to_tensormap,
    to_numpy,
    to_torch,
)
from aumai_fedtrain.trainer import ModelInit, TrainerFactory

__all__ = [
    "BufferPolicy",
    "DataFactory",
    "LossFunction",
    "ModelFactory",
    "OptimizerFactory",
    "TorchTrainer",
    "build_model",
    "default_optimizer",
    "model_init",
    "trainer_factory",
]

BufferPolicy = Literal["average", "local"]
"""How buffers (BatchNorm statistics, counters) take part: see :class:`TorchTrainer`."""
ModelFactory = Callable[[TrainingConfig], nn.Module]
"""``model(config) -> nn.Module``: builds the model (called under the run's seed)."""
LossFunction = Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, int]]
"""``loss(model, batch) -> loss`` or ``(loss, samples)``: the scalar loss of one mini-batch."""
OptimizerFactory = Callable[[nn.Module, TrainingConfig], torch.optim.Optimizer]
"""``optimizer(model, config) -> torch.optim.Optimizer``: the node's inner optimizer."""
DataFactory = Callable[[str, TrainingConfig], Iterable[Any]]
"""``data(node_id, config) -> iterable of batches``: a node's own data."""

_OPTIMIZER = "optimizer/"
_BUFFERS = "buffers/"
_BATCHES = "data/batches"


def _seed(*parts: object) -> int:
    text = json.dumps([str(part) for part in parts]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def build_model(
    model: ModelFactory, config: TrainingConfig, device: str | torch.device | None = None
) -> nn.Module:
    """``model(config)`` built under a seed derived from ``config.seed`` (then on ``device``).

    The caller's random state is left as it was. Raises ``TypeError`` when the factory returns
    something that is not an ``nn.Module``.
    """
    with torch.random.fork_rng():
        torch.manual_seed(_seed(config.seed, "model"))
        built = model(config)
    if not isinstance(built, nn.Module):
        raise TypeError(f"the model factory returned a {type(built).__name__}, not an nn.Module")
    return built.to(device) if device is not None else built


def model_init(model: ModelFactory) -> ModelInit:
    """The coordinator's ``model_init``: every ``state_dict`` entry of :func:`build_model`."""

    def initial_parameters(config: TrainingConfig) -> TensorMap:
        return state_dict_to_tensormap(build_model(model, config).state_dict())

    return initial_parameters


def default_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, ``lr = config.learning_rate`` (torch's defaults
    otherwise: betas (0.9, 0.999), eps 1e-8, weight decay 0.01)."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return torch.optim.AdamW(trainable, lr=config.learning_rate)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _samples_in(batch: Any) -> int | None:
    """The length of the first tensor in ``batch`` (None when it has none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, tuple | list) or isinstance(batch, Mapping):
        for value in values:
            found = _samples_in(value)
            if found is not None:
                return found
    return None


class TorchTrainer:
    """A DiLoCo node for any ``nn.Module`` (implements the node-trainer interface).

    Parameters
    ----------
    node_id, config
        The node and the run's configuration (``local_steps``, ``learning_rate``, ``seed``).
    model
        ``model(config) -> nn.Module``; built under the run's seed, so that it matches the
        coordinator's :func:`model_init`. The model trains where it is (CUDA when the factory
        puts it there, else the CPU) unless ``device`` is given.
    loss
        ``loss(model, batch)``: the scalar loss of a batch (its tensors already on the model's
        device), or ``(loss, samples)``. Without ``samples`` a batch counts the length of its
        first tensor.
    data
        The node's batches: any iterable (a list, a ``DataLoader``); when it runs out the next
        pass starts, so it must be iterable again. After a restart (:meth:`load_state_dict`)
        the trainer skips the batches it had used, so for an exact resume the order of the
        batches must not depend on torch's global random state (give a shuffling
        ``DataLoader`` its own ``generator``).
    optimizer
        ``optimizer(model, config)``: the inner optimizer, kept across rounds;
        :func:`default_optimizer` (AdamW) by default.
    buffers
        ``"local"`` (default): each node trains with its own buffers (BatchNorm's running
        statistics and counter), kept across rounds and in :meth:`state_dict`, never sent: the
        pseudo-gradient of a buffer is zero, so the global model keeps every buffer (and
        ``load_state_dict`` takes an exported model) with its initial value; recompute the
        statistics of the final model on data (``torch.optim.swa_utils.update_bn``).
        ``"average"``: buffers are loaded from the global model each round and averaged
        through the outer step like parameters, which is an exact average with plain averaging
        (``outer_learning_rate=1``, ``outer_momentum=0``); the outer momentum extrapolates
        them, and can make a running variance negative.
    device
        Move the model there (``"cuda"``, ``"cpu"``); None keeps the factory's placement.
    """

    def __init__(
        self,
        node_id: str,
        config: TrainingConfig,
        *,
        model: ModelFactory,
        loss: LossFunction,
        data: Iterable[Any],
        optimizer: OptimizerFactory | None = None,
        buffers: BufferPolicy = "local",
        device: str | torch.device | None = None,
    ) -> None:
        if buffers not in ("average", "local"):
            raise ValueError(f"buffers must be 'average' or 'local', got {buffers!r}")
        self.node_id = node_id
        self.config = config
        self.loss = loss
        self.data = data
        self.buffers: BufferPolicy = buffers
        self._model_factory = model
        self.model = build_model(model, config, device)
        self.optimizer = (optimizer or default_optimizer)(self.model, config)
        first = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._buffer_names = frozenset(dict(self.model.named_buffers())) & frozenset(
            self.model.state_dict()
        )
        self._iterator: Iterator[Any] | None = None
        self._pass_batches = 0
        self.batches_used = 0
        """Batches taken from the data so far, over all rounds."""
        self._initial: TensorMap | None = None

    def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
        """``local_steps`` inner steps from ``parameters`` (the initial model when empty).

        Returns the pseudo-gradient of every ``state_dict`` entry (float32 for float32 and
        16-bit tensors, float64 for float64 tensors and integer buffers), the mean loss and
        the samples processed. Raises ``ValueError`` for parameters that are not the model's.
        """
        start = parameters if parameters else self._initial_parameters()
        check_matches(start, self.model.state_dict())
        kept = self._kept_buffers()
        load_tensormap(self.model, {**start, **self._current(kept)})
        with torch.random.fork_rng():
            torch.manual_seed(_seed(self.config.seed, self.node_id, round_id))
            loss, samples = self._local_steps()
        delta = {}
        for name, trained in self.model.state_dict().items():
            dtype = exchange_dtype(trained.dtype)
            if name in kept:
                delta[name] = torch.zeros(trained.shape, dtype=dtype).numpy()
                continue
            began = to_torch(start[name], torch.empty(0, dtype=trained.dtype)).to(dtype)
            delta[name] = (began - trained.to("cpu", dtype)).numpy()
        return delta, loss, samples

    def _kept_buffers(self) -> frozenset[str]:
        return self._buffer_names if self.buffers == "local" else frozenset()

    def _current(self, names: frozenset[str]) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        return {name: state[name] for name in names}

    def _local_steps(self) -> tuple[float, int]:
        self.model.train()
        losses = []
        samples = 0
        for _ in range(self.config.local_steps):
            batch = self._next_batch()
            counted = _samples_in(batch)
            self.optimizer.zero_grad(set_to_none=True)
            result = self.loss(self.model, _to_device(batch, self.device))
            loss, count = result if isinstance(result, tuple) else (result, counted)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TypeError(
                    "the loss function must return a scalar tensor (or (loss, samples))"
                )
            if count is None:
                raise TypeError(
                    "cannot tell how many samples a batch holds: return (loss, samples) from "
                    "the loss function"
                )
            torch.autograd.backward(loss)
            self.optimizer.step()
            losses.append(loss.detach())
            samples += operator.index(count)
        return float(torch.stack(losses).double().mean()), samples

    def _next_batch(self) -> Any:
        for _ in range(2):
            if self._iterator is None:
                self._iterator, self._pass_batches = iter(self.data), 0
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self._pass_batches == 0:
                    raise ValueError(
                        f"the data of node {self.node_id!r} gave no batches on a new pass: "
                        "pass an iterable that can be iterated again (a list, a DataLoader), "
                        "not an iterator"
                    ) from None
                self._iterator = None
                continue
            self._pass_batches += 1
            self.batches_used += 1
            return batch
        raise AssertionError("unreachable")  # pragma: no cover

    def _initial_parameters(self) -> TensorMap:
        if self._initial is None:
            self._initial = model_init(self._model_factory)(self.config)
        return self._initial

    def _named_parameters(self) -> dict[int, str]:
        return {id(parameter): name for name, parameter in self.model.named_parameters()}

    def state_dict(self) -> TensorMap:
        """The inner optimizer's state (``optimizer/<parameter>/<name>``), the batches used
        (``data/batches``) and, with ``buffers="local"``, the node's buffers
        (``buffers/<name>``). CPU tensors share memory with the arrays."""
        names = self._named_parameters()
        state: TensorMap = {}
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                for key, value in self.optimizer.state.get(parameter, {}).items():
                    if value is None:
                        continue
                    if not isinstance(value, torch.Tensor):
                        raise TypeError(
                            f"the inner optimizer's state {key!r} of {names[id(parameter)]!r} "
                            f"is a {type(value).__name__}: only tensor state can be kept"
                        )
                    state[f"{_OPTIMIZER}{names[id(parameter)]}/{key}"] = to_numpy(value)
        if self.buffers == "local":
            for name, value in self._current(self._buffer_names).items():
                state[f"{_BUFFERS}{name}"] = to_numpy(value)
        state[_BATCHES] = np.array([float(self.batches_used)])
        return state

    def load_state_dict(self, state: TensorMap) -> None:
        """Restore :meth:`state_dict` (empty: back to a fresh trainer).

        Restores the inner optimizer, the buffers kept locally, and the data position (by
        skipping the batches used). Raises ``ValueError`` for a tensor it does not know.
        """
        names = self._named_parameters()
        order = {
            names[id(parameter)]: index
            for index, parameter in enumerate(
                parameter for group in self.optimizer.param_groups for parameter in group["params"]
            )
        }
        per_parameter: dict[int, dict[str, torch.Tensor]] = {}
        buffers: dict[str, Any] = {}
        batches = 0
        for name, value in state.items():
            if name.startswith(_OPTIMIZER):
                parameter, _, key = name.removeprefix(_OPTIMIZER).rpartition("/")
                if parameter not in order or not key:
                    raise ValueError(f"unexpected trainer state tensor {name!r}")
                tensor = torch.as_tensor(np.array(value))
                if key == "step" and tensor.dtype == torch.float64:
                    tensor = tensor.to(torch.get_default_dtype())  # torch keeps steps so
                per_parameter.setdefault(order[parameter], {})[key] = tensor
            elif name.startswith(_BUFFERS) and self.buffers == "local":
                buffers[name.removeprefix(_BUFFERS)] = value
            elif name == _BATCHES:
                batches = int(np.asarray(value).reshape(-1)[0])
            else:
                raise ValueError(f"unexpected trainer state tensor {name!r}")
        if self.buffers == "local":
            if not state:
                initial = self._initial_parameters()
                buffers = {name: initial[name] for name in self._buffer_names}
            missing = sorted(self._buffer_names - set(buffers))
            if missing:
                raise ValueError(
                    f"the trainer state lacks the node's buffer {missing[0]!r} (a state of a "
                    "trainer with buffers='average'?)"
                )
            load_tensormap(self.model, {**self.model.state_dict(), **buffers})
        template = self.optimizer.state_dict()
        self.optimizer.load_state_dict(
            {"state": per_parameter, "param_groups": template["param_groups"]}
        )
        self._skip_to(batches)

    def _skip_to(self, batches: int) -> None:
        self._iterator, self.batches_used = None, 0
        for _ in range(batches):
            self._next_batch()


def trainer_factory(
    model: ModelFactory,
    loss: LossFunction,
    data: DataFactory,
    *,
    optimizer: OptimizerFactory | None = None,
    buffers: BufferPolicy = "local",
    device: str | torch.device | None = None,
) -> TrainerFactory:
    """A factory of :class:`TorchTrainer` s, one per node, each on ``data(node_id, config)``.

    Hand it to :class:`~aumai_fedtrain.providers.InProcessProvider`, or name it with
    ``aumai-fedtrain node --trainer module:name``. The other arguments are those of
    :class:`TorchTrainer`.
    """

    def factory(node_id: str, config: TrainingConfig) -> TorchTrainer:
        return TorchTrainer(
            node_id,
            config,
            model=model,
            loss=loss,
            data=data(node_id, config),
            optimizer=optimizer,
            buffers=buffers,
            device=device,
        )

    return factory
