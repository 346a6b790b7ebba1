"""The ``run`` options that choose the aggregation rule (``TrainingConfig.aggregation``) and
the nodes' compression codec (``TrainingConfig.compression``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, get_args

import click
from pydantic import ValidationError

from aumai_fedtrain.cli.errors import InputError, one_line
from aumai_fedtrain.models import (
    AggregationConfig,
    CompressionCodec,
    CompressionConfig,
    TrainingConfig,
)
from aumai_fedtrain.robust import bucket_count, check_krum

__all__ = [
    "AGGREGATION_OPTIONS",
    "COMPRESSION_OPTIONS",
    "aggregation_options",
    "with_aggregation",
    "with_compression",
]

CommandT = TypeVar("CommandT", bound=Callable[..., Any])

RULES = ("mean", "median", "trimmed_mean", "centered_clip", "krum")

OFF = "off"
"""What ``--balance-limit`` and ``--reputation-warmup`` take to turn their filter off."""

_FILTERS = {"balance_limit": "--balance-limit", "reputation_warmup": "--reputation-warmup"}


class _NumberOrOff(click.ParamType[Any]):
    """A number of ``kind``, or ``off`` (the option's filter off)."""

    def __init__(self, kind: type[int] | type[float]) -> None:
        self.kind = kind
        self.name = f"{kind.__name__}|off"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == OFF or isinstance(value, self.kind):
            return value
        try:
            return self.kind(value)
        except ValueError:
            noun = "an integer" if self.kind is int else "a number"
            self.fail(f"{value!r} is neither {noun} nor {OFF!r}", param, ctx)


_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--aggregation", "rule"),
        {
            "type": click.Choice(RULES),
            "help": "How updates are combined: the weighted mean (default) or a Byzantine-robust "
            "rule.",
        },
    ),
    (
        ("--trim-fraction", "trim_fraction"),
        {
            "type": float,
            "help": "trimmed_mean: drop floor(F * N) values per side and coordinate "
            "(0 <= F < 0.5; default 0.25).",
        },
    ),
    (
        ("--clip-radius", "clip_radius"),
        {
            "type": float,
            "help": "centered_clip: clip radius in L2 norm (default: the round's median "
            "distance from the coordinate-wise median).",
        },
    ),
    (
        ("--clip-iterations", "clip_iterations"),
        {"type": int, "help": "centered_clip: clipping iterations (default 3)."},
    ),
    (
        ("--clip-start", "clip_start"),
        {
            "type": click.Choice(["median", "previous"]),
            "help": "centered_clip: start from the round's coordinate-wise median (default) or "
            "the previous round's aggregate.",
        },
    ),
    (
        ("--clip-radius-multiple", "clip_radius_multiple"),
        {
            "type": float,
            "help": "centered_clip without --clip-radius: the radius as this multiple of the "
            "round's median distance from the start (default 1).",
        },
    ),
    (
        ("--bucket-size", "bucket_size"),
        {
            "type": int,
            "help": "Robust rules: average random buckets of this many updates first, then "
            "apply the rule to the bucket means (default 1: no bucketing).",
        },
    ),
    (
        ("--krum-f", "krum_f"),
        {"type": int, "help": "krum: assumed attackers f (default 2; needs N >= f + 3)."},
    ),
    (
        ("--krum-m", "krum_m"),
        {"type": int, "help": "krum: updates averaged, 1..N-f (default N - f; 1 is Krum)."},
    ),
    (
        ("--balance-limit", "balance_limit"),
        {
            "type": _NumberOrOff(float),
            "help": "Robust rules: exclude an update for the round when its share of values "
            "below minus above the round's median exceeds this in magnitude (0 < L <= 1; "
            "default 0.5; off: no balance filter).",
        },
    ),
    (
        ("--reputation-warmup", "reputation_warmup"),
        {
            "type": _NumberOrOff(int),
            "help": "Robust rules: exclude a node whose updates' mean cosine with the previous "
            "aggregate is negative once it has this many (default 3; off: no reputation).",
        },
    ),
    (
        ("--norm-clip", "norm_clip"),
        {
            "type": float,
            "help": "Scale updates down to at most this multiple of the round's median update "
            "norm before the rule (any rule).",
        },
    ),
]

_COMPRESSION: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--compression", "codec"),
        {
            "type": click.Choice(get_args(CompressionCodec)),
            "help": "Codec the simulated nodes compress their updates with (default none; "
            "4-bit: int4).",
        },
    ),
    (
        ("--compression-block", "block_size"),
        {
            "type": int,
            "help": "int8/int4/e3m0: values per float32 scale, a power of two from 8 to 65536 "
            "(default 128).",
        },
    ),
    (
        ("--error-feedback/--no-error-feedback", "error_feedback"),
        {
            "default": None,
            "help": "Carry what the codec lost into the node's next update (default: on).",
        },
    ),
]

AGGREGATION_OPTIONS = tuple(names[1] for names, _ in _OPTIONS)
"""The parameter names :func:`aggregation_options` adds to a command for the rule."""

COMPRESSION_OPTIONS = tuple(names[1] for names, _ in _COMPRESSION)
"""The parameter names :func:`aggregation_options` adds to a command for compression."""


def aggregation_options(command: CommandT) -> CommandT:
    """Add ``--aggregation``, the rules' parameter options and the compression options to a
    command."""
    for names, settings in reversed(_OPTIONS + _COMPRESSION):
        command = click.option(*names, **settings)(command)
    return command


def with_aggregation(
    config: TrainingConfig, options: dict[str, Any], simulated: bool
) -> TrainingConfig:
    """``config`` with the aggregation options that were given.

    Raises :class:`InputError` for invalid values, for the robust rules' filter options given
    with the plain mean (which ignores them), and in a ``simulated`` run (whose node count is
    ``config.num_nodes``) for a multi-Krum whose ``f`` or ``m`` does not fit it.
    """
    given = {
        name: None if value == OFF else value
        for name, value in options.items()
        if value is not None
    }
    merged = {**config.aggregation.model_dump(), **given}
    try:
        aggregation = AggregationConfig.model_validate(merged)
        ignored = [flag for name, flag in _FILTERS.items() if options.get(name) is not None]
        if aggregation.rule == "mean" and ignored:
            raise ValueError(
                f"{ignored[0]} applies to the robust rules; the mean ignores it (choose "
                "--aggregation median, trimmed_mean, centered_clip or krum)"
            )
        if simulated and aggregation.rule == "krum":
            buckets = bucket_count(config.num_nodes, aggregation.bucket_size)
            check_krum(buckets, aggregation.krum_f, aggregation.krum_m)
    except (ValidationError, ValueError) as exc:
        raise InputError(f"aggregation options: {_with_flags(one_line(exc), given)}") from None
    return config.model_copy(update={"aggregation": aggregation})


def _with_flags(message: str, given: dict[str, Any]) -> str:
    """``message`` with the flag beside each field of ``given`` that it names
    (``balance_limit`` -> ``balance_limit (--balance-limit)``)."""
    flags = {names[1]: names[0] for names, _ in _OPTIONS}
    for name in given:
        message = message.replace(f"{name}:", f"{name} ({flags[name]}):", 1)
    return message


def with_compression(config: TrainingConfig, options: dict[str, Any]) -> TrainingConfig:
    """``config`` with the compression options that were given; :class:`InputError` for
    invalid values. Simulated and real nodes alike compress with them."""
    given = {name: value for name, value in options.items() if value is not None}
    try:
        compression = CompressionConfig.model_validate({**config.compression.model_dump(), **given})
    except ValidationError as exc:
        raise InputError(f"compression options: {one_line(exc)}") from None
    return config.model_copy(update={"compression": compression})
