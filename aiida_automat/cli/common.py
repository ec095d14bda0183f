"""Shared pieces of the command line: one-line errors, never a traceback for a user mistake."""

from __future__ import annotations

import contextlib
import functools
import logging
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


class _ShortTracebackFormatter(logging.Formatter):
    """Wraps a console handler's formatter: a log record that carries a traceback is printed as its first
    line and the exception's last line.

    AiiDA reports a step that raised (e.g. a candidate refused with ``NoCandidate``, which the WorkChain
    handles) with the full traceback. The user needs the one line; the full text stays in the process's log
    in the database (``verdi process report``) and on the console with ``AUTOMAT_DEBUG=1``.
    """

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        marker = "Traceback (most recent call last)"
        if marker not in text:
            return text
        head = text.split(marker, 1)[0].rstrip()
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
        return f"{head} {last}".strip()


@contextlib.contextmanager
def short_tracebacks(logger_name: str = "aiida"):
    """Shorten tracebacks on the console handlers of ``logger_name`` while the block runs (not on the
    database log handler, which keeps them for ``verdi process report``)."""
    import os

    if os.environ.get("AUTOMAT_DEBUG"):
        yield
        return
    swapped = []
    for handler in logging.getLogger(logger_name).handlers:
        if type(handler) is logging.StreamHandler:  # the console; AiiDA's DbLogHandler is no StreamHandler
            swapped.append((handler, handler.formatter))
            handler.setFormatter(_ShortTracebackFormatter(handler.formatter))
    try:
        yield
    finally:
        for handler, formatter in swapped:
            handler.setFormatter(formatter)


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
