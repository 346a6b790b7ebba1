"""Your code on the command line: ``--trainer``, ``--model-init`` and ``--evaluator``.

Each names a function as ``module:function``; the current folder is importable, so a file
``my_model.py`` beside you is ``my_model:function``.

- ``--trainer module:factory``: ``factory(node_id, config) -> NodeTrainer`` (see
  :mod:`aumai_fedtrain.trainer`), the training of every node.
- ``--model-init module:function``: ``function(config) -> {name: array}``, the initial
  global model.
- ``--evaluator module:function``: ``function(parameters, config) -> (loss, accuracy)``, the
  held-out evaluation of the global model after every round.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from aumai_fedtrain.cli.errors import InputError
from aumai_fedtrain.models import TensorMap, TrainingConfig
from aumai_fedtrain.trainer import Evaluator, ModelInit, TrainerFactory

__all__ = ["load_evaluator", "load_function", "load_model_init", "load_trainer_factory"]


def load_function(spec: str, option: str) -> Callable[..., Any]:
    """The function named by ``module:function``; :class:`InputError` naming ``option``."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise InputError(f"{option} must look like module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure of the user's module, reported in one line
        raise InputError(
            f"{option}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    function: object = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"{option}: {module_name!r} has no function {function_name!r}")
    return function


def load_trainer_factory(spec: str) -> TrainerFactory:
    """``--trainer``: the factory of the nodes' trainers."""
    factory: TrainerFactory = load_function(spec, "--trainer")
    return factory


def load_model_init(spec: str) -> ModelInit:
    """``--model-init``: the function that makes the initial global model."""
    model_init: ModelInit = load_function(spec, "--model-init")
    return model_init


def load_evaluator(spec: str, config: TrainingConfig) -> Evaluator:
    """``--evaluator``: the global model's evaluation, bound to the run's ``config``."""
    function = load_function(spec, "--evaluator")

    def evaluate(parameters: TensorMap) -> tuple[float, float]:
        result: tuple[float, float] = function(parameters, config)
        return result  # checked by the coordinator

    return evaluate
