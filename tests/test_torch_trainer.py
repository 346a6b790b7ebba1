"""TorchTrainer: DiLoCo with one worker is local training; state, buffers and data are kept."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, TrainingConfig
from aumai_fedtrain.models import to_tensor
from aumai_fedtrain.providers import InProcessProvider
from aumai_fedtrain.torch import (
    TorchTrainer,
    build_model,
    model_init,
    state_dict_to_tensormap,
    trainer_factory,
)
from aumai_fedtrain.torch.trainer import default_optimizer
from tests import torch_models

Batch = tuple[torch.Tensor, torch.Tensor]
CONFIG = TrainingConfig(
    model_name="torch-test", batch_size=16, local_steps=5, learning_rate=0.01, seed=3
)


def regression_batches(count: int, size: int = 16) -> list[Batch]:
    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(count, size, 6, generator=generator)
    targets = inputs.sum(dim=2, keepdim=True).tanh()
    return list(zip(inputs, targets, strict=True))


def mlp_in(dtype: torch.dtype) -> Any:
    def make(config: TrainingConfig) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)

    return make


def mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs, targets = batch
    return functional.mse_loss(model(inputs.to(model[0].weight.dtype)).float(), targets)


def sgd(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9)


# AdamW's eps (1e-8) is 0 in float16: pure float16 training takes SGD with momentum here.
@pytest.mark.parametrize(
    ("dtype", "make_optimizer"),
    [(torch.float32, default_optimizer), (torch.bfloat16, default_optimizer),
     (torch.float16, sgd)],
    ids=["float32-adamw", "bfloat16-adamw", "float16-sgd"],
)  # fmt: skip
def test_one_worker_with_plain_averaging_is_local_training(
    dtype: torch.dtype, make_optimizer: Any
) -> None:
    # Prepare: H plain AdamW steps on the batches, and the same as one DiLoCo round of one
    # worker with outer learning rate 1 and no momentum
    steps = 20
    batches = regression_batches(steps)
    config = CONFIG.model_copy(
        update={"local_steps": steps, "num_nodes": 1, "global_rounds": 1,
                "outer_learning_rate": 1.0, "outer_momentum": 0.0}
    )  # fmt: skip
    plain = build_model(mlp_in(dtype), config)
    initial = {name: tensor.clone() for name, tensor in plain.state_dict().items()}
    optimizer = make_optimizer(plain, config)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = mse(plain, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    provider = InProcessProvider(
        trainer_factory(mlp_in(dtype), mse, lambda node, cfg: batches, optimizer=make_optimizer),
        model_init=model_init(mlp_in(dtype)),
    )

    # Execute
    result = DiLoCoCoordinator().run_training(config, [FederatedNode(node_id="solo")], provider)

    # Assert: theta - (theta - theta_local), rounded to the model's dtype, is theta_local up to
    # the rounding of the pseudo-gradient: one unit in the last place of the larger magnitude
    assert result.final_state.parameters is not None
    assert result.history[0].avg_loss == pytest.approx(np.mean(losses), rel=1e-12)
    for name, trained in plain.state_dict().items():
        got = torch.as_tensor(result.final_state.parameters[name]).to(dtype).double()
        want, start = trained.double(), initial[name].double()
        ulp = torch.as_tensor(
            np.spacing(np.maximum(start.abs().numpy(), want.abs().numpy()).astype(np.float32))
        ).double()
        ulp = torch.maximum(ulp, (want.abs() * torch.finfo(dtype).eps).double())
        assert bool(((got - want).abs() <= ulp).all()), name
        assert not torch.equal(want, start), name  # it did train
    # the coordinator holds the global copy and momentum of every such model in float32
    state = result.final_state
    for tensors in (state.parameters, state.momentum, state.global_weights):
        assert tensors is not None
        assert {value.dtype for value in tensors.values()} == {np.dtype(np.float32)}


def trainer(node_id: str = "node-000", **options: Any) -> TorchTrainer:
    config = CONFIG.model_copy(update={"seed": 5})
    return TorchTrainer(
        node_id,
        config,
        model=torch_models.make_model,
        loss=torch_models.loss,
        data=torch_models.node_data(node_id, config),
        **options,
    )


def as_checkpointed(state: dict[str, np.ndarray], stored: str) -> dict[str, np.ndarray]:
    """A trainer state as a checkpoint gives it back: copies in their own float dtype (integers
    as float64), or, from a checkpoint of an older version, all in float64."""
    if stored == "float64":
        return {name: np.array(value, dtype=np.float64) for name, value in state.items()}
    return {name: to_tensor(value).copy() for name, value in state.items()}


@pytest.mark.parametrize("stored", ["own dtype", "float64"])
@pytest.mark.parametrize("buffers", ["local", "average"])
def test_a_restored_trainer_continues_exactly(buffers: str, stored: str) -> None:
    # Prepare: two rounds (10 of the node's 6 batches: the data is mid-pass), then a new
    # trainer that takes up the state, and one that does not
    first = trainer(buffers=buffers)
    parameters = torch_models.initial_model(first.config)
    for round_id in (1, 2):
        delta, _, _ = first.train(round_id, parameters)
        parameters = {k: v - 0.5 * delta[k].astype(np.float64) for k, v in parameters.items()}
    restored, fresh = trainer(buffers=buffers), trainer(buffers=buffers)
    restored.load_state_dict(as_checkpointed(first.state_dict(), stored))

    # Execute
    expected = first.train(3, parameters)
    got, not_restored = restored.train(3, parameters), fresh.train(3, parameters)

    # Assert
    assert restored.batches_used == first.batches_used == 15
    assert got[1:] == expected[1:]
    for name, value in expected[0].items():
        assert got[0][name].tobytes() == value.tobytes(), name
    assert not_restored[1] != expected[1]
    assert sorted(first.state_dict()) == sorted(restored.state_dict())
    if buffers == "average":
        with pytest.raises(ValueError, match=r"lacks the node's buffer 'norm\.num_batches"):
            trainer(buffers="local").load_state_dict(first.state_dict())


def test_buffers_are_averaged_or_kept_local() -> None:
    # Prepare: plain averaging, so that averaged buffers are exactly the nodes' mean
    config = CONFIG.model_copy(
        update={"seed": 5, "num_nodes": 2, "global_rounds": 1, "outer_learning_rate": 1.0,
                "outer_momentum": 0.0, "aggregation_weights": "uniform"}
    )  # fmt: skip
    nodes = [FederatedNode(node_id=node_id) for node_id in ("a", "b")]
    initial = torch_models.initial_model(config)
    results = {}
    providers = {}
    for policy in ("average", "local"):
        factory = trainer_factory(
            torch_models.make_model, torch_models.loss, torch_models.node_data, buffers=policy
        )
        providers[policy] = InProcessProvider(factory, model_init=torch_models.initial_model)
        results[policy] = DiLoCoCoordinator().run_training(config, nodes, providers[policy])

    # Assert: the nodes' statistics moved; "average" has their mean (and the counter the
    # steps taken), "local" leaves the global buffers as they were and keeps them per node
    averaged = results["average"].final_state.parameters
    kept = results["local"].final_state.parameters
    assert averaged is not None and kept is not None
    node_means = [
        providers["local"].trainer(node).model.state_dict()["norm.running_mean"].double().numpy()
        for node in ("a", "b")
    ]
    assert not np.array_equal(node_means[0], node_means[1])
    np.testing.assert_allclose(averaged["norm.running_mean"], np.mean(node_means, axis=0), 1e-6)
    assert averaged["norm.num_batches_tracked"].item() == config.local_steps
    for name in ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked"):
        assert kept[name].dtype == to_tensor(initial[name]).dtype, name  # float32, or float64
        assert kept[name].tobytes() == to_tensor(initial[name]).tobytes(), name  # for the count
    state = providers["local"].state_dict()
    assert state["node/a/buffers/norm.num_batches_tracked"].item() == config.local_steps
    assert "node/a/buffers/norm.running_mean" not in providers["average"].state_dict()


def test_a_round_starts_from_the_initial_model_without_parameters_and_keeps_rng() -> None:
    generator_state = torch.get_rng_state()

    empty, given = trainer().train(1, {}), trainer().train(1, trainer().model.state_dict())

    assert empty[1:] == given[1:]
    assert all(empty[0][k].tobytes() == given[0][k].tobytes() for k in empty[0])
    assert torch.equal(torch.get_rng_state(), generator_state)  # dropout drew from a fork


def test_a_loss_can_count_its_samples_and_bad_inputs_are_clear_errors() -> None:
    config = CONFIG.model_copy(update={"local_steps": 3})
    counted = TorchTrainer(
        "n",
        config,
        model=torch_models.make_model,
        loss=lambda model, batch: (torch_models.loss(model, batch), 7),
        data=torch_models.node_data("n", config),
    )
    assert counted.train(1, {})[2] == 21
    parameters = torch_models.initial_model(config)
    with pytest.raises(ValueError, match=r"missing 'out\.bias'"):
        counted.train(2, {k: v for k, v in parameters.items() if k != "out.bias"})
    once = iter(torch_models.node_data("n", config))
    exhausted = TorchTrainer(
        "n", config.model_copy(update={"local_steps": 7}), model=torch_models.make_model,
        loss=torch_models.loss, data=once,
    )  # fmt: skip
    with pytest.raises(ValueError, match="not an iterator"):
        exhausted.train(1, {})
    batches = torch_models.node_data("n", config)
    unsized = TorchTrainer(
        "n", config, model=torch_models.make_model, data=[{"index": i} for i in range(3)],
        loss=lambda model, batch: torch_models.loss(model, batches[batch["index"]]),
    )  # fmt: skip
    with pytest.raises(TypeError, match="cannot tell how many samples a batch holds"):
        unsized.train(1, {})
    empty = TorchTrainer(
        "n", config, model=torch_models.make_model, loss=torch_models.loss, data=[]
    )
    with pytest.raises(ValueError, match="gave no batches"):
        empty.train(1, {})
    with pytest.raises(ValueError, match=r"unexpected trainer state tensor 'optimizer/nope/step'"):
        counted.load_state_dict({"optimizer/nope/step": np.zeros(())})
    with pytest.raises(TypeError, match=r"not an nn\.Module"):
        TorchTrainer("n", config, model=lambda c: None, loss=torch_models.loss, data=[])  # type: ignore[arg-type,return-value]


def test_an_empty_state_is_a_fresh_trainer() -> None:
    used, fresh = trainer(), trainer()
    used.train(1, {})
    used.train(2, {})

    used.load_state_dict({})

    again, expected = used.train(1, {}), fresh.train(1, {})
    assert again[1:] == expected[1:]
    assert all(again[0][k].tobytes() == expected[0][k].tobytes() for k in expected[0])
    assert used.state_dict()["buffers/norm.num_batches_tracked"].item() == CONFIG.local_steps


def test_an_optimizer_without_state_keeps_none() -> None:
    plain_sgd = trainer(optimizer=lambda model, config: torch.optim.SGD(model.parameters(), 0.1))

    plain_sgd.train(1, {})
    state = plain_sgd.state_dict()
    plain_sgd.load_state_dict(as_checkpointed(state, "own dtype"))

    assert sorted(state) == [
        "buffers/norm.num_batches_tracked", "buffers/norm.running_mean",
        "buffers/norm.running_var", "data/batches",
    ]  # fmt: skip
    assert plain_sgd.batches_used == CONFIG.local_steps


def test_the_coordinators_initial_model_is_every_state_dict_entry() -> None:
    config = CONFIG.model_copy(update={"seed": 9})

    initial = torch_models.initial_model(config)

    model = build_model(torch_models.make_model, config)
    assert list(initial) == list(model.state_dict())
    assert initial["norm.num_batches_tracked"].dtype == np.int64
    reference = state_dict_to_tensormap(model.state_dict())
    assert all(initial[k].tobytes() == reference[k].tobytes() for k in initial)
    other = torch_models.initial_model(config.model_copy(update={"seed": 10}))
    assert initial["hidden.weight"].tobytes() != other["hidden.weight"].tobytes()
