"""``aiida-automat daemon`` and ``aiida-automat result``: submitted reconstructions, start to finish.

The daemon is AiiDA's (``verdi daemon``); with the embedded profile the ZeroMQ broker runs inside it, so
``--submit`` needs it running. ``verdi`` finds its own executable on ``PATH`` only, which a user who calls
``.venv/bin/aiida-automat`` without activating the environment does not have: these commands put this
installation's ``bin`` folder first.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import click

from .common import user_errors


def _profile() -> str:
    from ..profile import ensure_setup

    return ensure_setup().profile


def _verdi(*args: str) -> int:
    profile = _profile()
    bindir = pathlib.Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.call([str(bindir / "verdi"), "-p", profile, "daemon", *args], env=env)


@click.group("daemon")
def daemon_group():
    """Start, stop and inspect the AiiDA daemon of the aiida-automat profile (needed by --submit)."""


@daemon_group.command("start")
@click.argument("workers", type=click.IntRange(1, 64), default=2)
def daemon_start(workers):
    """Start the daemon with WORKERS worker processes (default 2)."""
    sys.exit(_verdi("start", str(workers)))


@daemon_group.command("stop")
@click.option("--timeout", type=int, default=300, show_default=True, help="Seconds to wait for the workers to exit.")
def daemon_stop(timeout):
    """Stop the daemon and wait until its processes are gone; workflows resume at the next start.

    Workers finish the calculation step they are in before exiting, which can take longer than
    ``verdi daemon stop`` waits; a ``daemon start`` issued meanwhile would find the old daemon and do
    nothing, so this command returns only once the daemon has really exited.
    """
    import time

    from aiida.engine.daemon.client import get_daemon_client

    pid = get_daemon_client(_profile()).get_daemon_pid()
    _verdi("stop")
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid) and time.monotonic() < deadline:
        time.sleep(1)
    if pid is not None and _alive(pid):
        click.secho(f"Error: the daemon (pid {pid}) is still running after {timeout} s", fg="red", err=True)
        sys.exit(1)
    click.echo("daemon stopped")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@daemon_group.command("status")
def daemon_status():
    """Show whether the daemon runs, its workers and the broker's queue."""
    sys.exit(_verdi("status"))


@click.command("result")
@click.argument("pk", type=int)
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
              help="Write structure.cif, result.json and overlay.png here (default: automat-result-PK).")
@user_errors
def result(pk, output_dir):
    """Summarise a finished reconstruction PK (e.g. one submitted with --submit) and write its files."""
    from aiida.common.exceptions import NotExistent

    from ..errors import AutomatError
    from ..profile import ensure_setup
    from ..workflows.reconstruction import ReconstructionWorkChain
    from .reconstruct import print_summary, result_of, write_outputs

    ensure_setup()
    from aiida import orm

    try:
        node = orm.load_node(pk)
    except NotExistent:
        raise AutomatError(f"no process with pk {pk} in this profile") from None
    if not isinstance(node, orm.WorkChainNode) or node.process_label != ReconstructionWorkChain.__name__:
        raise AutomatError(f"node {pk} is not a ReconstructionWorkChain")
    payload = result_of(node)
    write_outputs(node, payload, output_dir or pathlib.Path(f"automat-result-{pk}"))
    print_summary(payload)
