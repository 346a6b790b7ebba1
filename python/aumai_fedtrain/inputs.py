"""Reading user-supplied files, with one-line errors that name the file and the bad field."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


def describe_validation_error(error: ValidationError, limit: int = 3) -> str:
    """One line naming each invalid field (``unknown key 'x'`` for unexpected ones)."""
    parts = []
    for item in error.errors()[:limit]:
        loc = item["loc"]
        if len(loc) == 2 and loc[0] == "gradients":
            location = f"gradient {loc[1]!r}"
        else:
            location = ".".join(str(part) for part in loc)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key {location!r}")
        elif location:
            parts.append(f"{location}: {message}")
        else:
            parts.append(message)
    more = error.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def read_text_file(path: str | Path, what: str, error: type[Exception]) -> str:
    """The UTF-8 text of a file, or ``error("cannot read <what> file '<path>': <reason>")``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(f"cannot read {what} file {str(path)!r}: {reason}") from None


def load_model_file(
    path: str | Path, model: type[ModelT], what: str, error: type[Exception] = ValueError
) -> ModelT:
    """Read and validate a JSON file as ``model``; ``error`` with one line on failure."""
    text = read_text_file(path, what, error)
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise error(
            f"invalid {what} file {str(path)!r}: {describe_validation_error(exc)}"
        ) from None
