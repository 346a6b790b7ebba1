"""How the command line reports failures: one line on stderr and an exit code."""

from __future__ import annotations

import sys
from typing import NoReturn

import click
from pydantic import ValidationError

from aumai_fedtrain.inputs import describe_validation_error

__all__ = ["InputError", "fail", "one_line"]


class InputError(click.ClickException):
    """Bad input from the user (a file, its JSON, a config key, an option): CLI exit code 2."""

    exit_code = 2


def one_line(exc: Exception) -> str:
    """The exception's message on one line (a pydantic error as its fields, like bad input)."""
    message = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def fail(message: str, code: int) -> NoReturn:
    """Print ``Error: <message>`` on stderr and exit with ``code``."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)
