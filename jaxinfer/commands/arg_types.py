"""argparse types for the CLI's numbers and files: a bad value is refused while the command line is
parsed, with its reason (argparse prints an ArgumentTypeError's message, but hides a ValueError's),
before anything loads or compiles.

    positive(int) / positive(float)   one value > 0
    positive_list(int)                "1,8,64": every value > 0 (float lists may hold inf)
    non_negative(int/float)           one value >= 0 (seeds, timeouts that may be zero)
    at_least(int, low)                one value >= low
    port                              0-65535 (0: the system picks a free port)
    existing_file                     a path that is a file
    argument_type(parse, name)        any parse function that raises JaxinferError
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxinfer.errors import JaxinferError, RequestError


def argument_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """`parse` as an argparse type: its JaxinferError becomes the message argparse prints."""
    def checked(text: str) -> Any:
        try:
            return parse(text)
        except JaxinferError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    checked.__name__ = name  # argparse names the type in "invalid NAME value" when there is no message
    return checked


def _bounded(kind: type, text: str, low: float, inclusive: bool) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise RequestError(f"{text!r} is not {'an' if kind is int else 'a'} {kind.__name__}") from None
    if not (value > low or (inclusive and value == low)):  # written so that nan fails too
        raise RequestError(f"{text!r} must be {'>=' if inclusive else '>'} {low}")
    return value


def positive(kind: type) -> Callable[[str], Any]:
    return argument_type(lambda text: _bounded(kind, text, 0, inclusive=False), f"positive {kind.__name__}")


def non_negative(kind: type) -> Callable[[str], Any]:
    return argument_type(lambda text: _bounded(kind, text, 0, inclusive=True), f"non-negative {kind.__name__}")


def at_least(kind: type, low: float) -> Callable[[str], Any]:
    return argument_type(lambda text: _bounded(kind, text, low, inclusive=True), f"{kind.__name__} >= {low}")


def positive_list(kind: type) -> Callable[[str], list]:
    """A comma-separated list of positive `kind` values."""
    return argument_type(lambda text: [_bounded(kind, v, 0, inclusive=False) for v in text.split(",")],
                         f"{kind.__name__} list")


def _port(text: str) -> int:
    value = _bounded(int, text, 0, inclusive=True)
    if value > 65535:
        raise RequestError(f"port {value} is above 65535")
    return value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise RequestError(f"{text} is not a file")
    return path


port = argument_type(_port, "port")
existing_file = argument_type(_existing_file, "file")
