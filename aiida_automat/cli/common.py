"""Shared pieces of the command line: one-line errors, never a traceback for a user mistake."""

from __future__ import annotations

import functools
import sys

import click

from ..errors import AutomatError


def echo_error(message: str) -> None:
    click.secho(f"Error: {message}", fg="red", err=True)


def user_errors(func):
    """Turn core errors and bad files into a one-line message and exit status 1.

    ``AUTOMAT_DEBUG=1`` re-raises, for developers who want the traceback.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import os

        try:
            return func(*args, **kwargs)
        except (AutomatError, FileNotFoundError, IsADirectoryError, PermissionError, LookupError, ValueError) as exc:
            if os.environ.get("AUTOMAT_DEBUG"):
                raise
            message = str(exc) if isinstance(exc, AutomatError) else f"{type(exc).__name__}: {exc}"
            echo_error(message.splitlines()[0] if message else type(exc).__name__)
            sys.exit(1)

    return wrapper


def parse_elements(value: str | None) -> tuple[str, ...] | None:
    """``"Mo,S"`` → ``("Mo", "S")``, rejecting symbols that are not elements."""
    if not value:
        return None
    from ase.data import chemical_symbols

    from ..errors import UnknownElement

    out = []
    for raw in value.replace(" ", "").split(","):
        if not raw:
            continue
        symbol = raw[0].upper() + raw[1:].lower()
        if symbol not in chemical_symbols[1:]:
            raise UnknownElement(f"{raw!r} is not a chemical element")
        out.append(symbol)
    return tuple(out)
