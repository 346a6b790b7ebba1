"""``aumai-fedtrain export``: the global model of a checkpoint as a safetensors file."""

from __future__ import annotations

import math
from pathlib import Path

import click

from aumai_fedtrain.checkpoint import CheckpointError
from aumai_fedtrain.cli.errors import InputError
from aumai_fedtrain.cli.plugins import load_function
from aumai_fedtrain.export import EXPORT_DTYPES, export_global_model
from aumai_fedtrain.files import safetensors_header

__all__ = ["export_command"]


@click.command("export")
@click.option(
    "--checkpoint-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The run's checkpoint directory.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The safetensors file to write (replaced atomically).",
)
@click.option(
    "--dtype",
    type=click.Choice(EXPORT_DTYPES),
    help="Cast every tensor to this dtype (default: the checkpoint's).",
)
@click.option(
    "--model",
    "model_spec",
    help="Your model factory, module:function(config) -> torch.nn.Module: write every tensor "
    "in that model's dtype, checked against its names and shapes (needs the torch extra).",
)
def export_command(
    checkpoint_dir: Path, out: Path, dtype: str | None, model_spec: str | None
) -> None:
    """Write the global model of a checkpoint to a safetensors file."""
    if dtype is not None and model_spec is not None:
        raise InputError("--dtype cannot go with --model (the model's dtypes are used)")
    try:
        if model_spec is None:
            export_global_model(checkpoint_dir, out, dtype=dtype)
        else:
            _export_torch(checkpoint_dir, out, model_spec)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    header = safetensors_header(out)
    metadata = header.pop("__metadata__", {})
    values = sum(math.prod(entry["shape"]) for entry in header.values())
    dtypes = ", ".join(sorted({entry["dtype"] for entry in header.values()}))
    click.echo(
        f"Exported the global model after round {metadata.get('round')} ({len(header)} "
        f"tensors, {values:,} values, {dtypes}) to {out}"
    )


def _export_torch(checkpoint_dir: Path, out: Path, model_spec: str) -> None:
    factory = load_function(model_spec, "--model")
    try:
        from aumai_fedtrain.torch import export_model
    except ImportError as exc:
        raise InputError(f"--model: {exc}") from None
    try:
        export_model(checkpoint_dir, out, factory)
    except (CheckpointError, OSError):
        raise
    except Exception as exc:  # the user's factory or a model of other names or shapes
        raise InputError(f"--model {model_spec}: {type(exc).__name__}: {exc}") from None
