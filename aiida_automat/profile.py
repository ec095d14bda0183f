"""The embedded default: an AiiDA profile that needs no external services.

A microscopist should get a result from ``aiida-automat demo`` without configuring PostgreSQL or RabbitMQ.
When no AiiDA profile exists in the active configuration folder (``$AIIDA_PATH/.aiida``, else
``~/.aiida``), we create one named ``automat`` like ``verdi presto --use-zeromq`` does: SQLite storage and
the built-in ZeroMQ broker (processes run in-process without a daemon; ``verdi daemon start`` enables
``--submit``). An existing default profile is always used as it is. ``ensure_setup`` is idempotent: it also
makes sure the ``localhost`` computer and the package's codes exist and point at this installation.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys

DEFAULT_PROFILE = "automat"
DEFAULT_EMAIL = "automat@localhost"
EXEC_NAME = "automat-exec"


@dataclasses.dataclass(frozen=True)
class SetupReport:
    profile: str
    created_profile: bool
    config_dir: str
    computer: str
    codes: dict
    messages: tuple


def executable_path() -> pathlib.Path:
    """The ``automat-exec`` of this very installation (next to the running interpreter first)."""
    candidate = pathlib.Path(sys.executable).with_name(EXEC_NAME)
    if candidate.exists():
        return candidate
    found = shutil.which(EXEC_NAME)
    if found:
        return pathlib.Path(found)
    raise FileNotFoundError(f"{EXEC_NAME} is not installed next to {sys.executable}; reinstall aiida-automat")


def load_or_create_profile(name: str | None = None, *, broker: str = "zeromq"):
    """Load the named/default profile; create the embedded one when the configuration has none."""
    from aiida import load_profile
    from aiida.manage.configuration import create_profile, get_config

    config = get_config(create=True)
    created = False
    if name is None:
        name = config.default_profile_name or (DEFAULT_PROFILE if not config.profile_names else config.profile_names[0])
    if name not in config.profile_names:
        broker_backend, broker_config = None, None
        if broker == "zeromq":
            from aiida.plugins import BrokerFactory

            broker_backend = "core.zeromq"
            broker_config = BrokerFactory(broker_backend).get_default_config()
        elif broker != "none":
            raise ValueError(f"unknown broker {broker!r}: use 'zeromq' or 'none'")
        profile = create_profile(
            config,
            name=name,
            email=DEFAULT_EMAIL,
            storage_backend="core.sqlite_dos",
            storage_config={},
            broker_backend=broker_backend,
            broker_config=broker_config,
        )
        config.set_option("runner.poll.interval", 1, scope=profile.name)
        if not config.default_profile_name:
            config.set_default_profile(profile.name)
        config.store()
        created = True
    profile = load_profile(name, allow_switch=True)
    return profile, created, config.dirpath


def get_or_create_localhost(config_dir: str):
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        return orm.load_computer("localhost")
    except NotExistent:
        pass
    workdir = pathlib.Path(config_dir) / "scratch" / "automat"
    computer = orm.Computer(
        label="localhost",
        hostname="localhost",
        description="This machine (created by aiida-automat setup)",
        transport_type="core.local",
        scheduler_type="core.direct",
        workdir=str(workdir),
    ).store()
    computer.configure(safe_interval=0)
    computer.set_minimum_job_poll_interval(1)
    computer.set_default_mpiprocs_per_machine(1)
    return computer


def get_or_create_code(computer, label: str, executable: pathlib.Path, plugin: str | None = None, description: str = ""):
    """An InstalledCode for ``executable`` on ``computer``; reused when one with that path exists.

    A code whose label is taken by another path (an older virtual environment) is left alone and a new
    label with a numeric suffix is used, so old provenance stays valid.
    """
    from aiida import orm

    # ``all()``, not ``iterall()``: an unfinished SQLite cursor keeps a read transaction open, and the
    # next write of this process then fails with "database is locked" as soon as a daemon worker commits.
    qb = orm.QueryBuilder().append(orm.InstalledCode, filters={"attributes.filepath_executable": str(executable)})
    for (code,) in qb.all():
        if code.computer.pk == computer.pk:
            return code
    taken = {c.label for (c,) in orm.QueryBuilder().append(orm.InstalledCode, project="*").all() if c.computer.pk == computer.pk}
    final, k = label, 1
    while final in taken:
        k += 1
        final = f"{label}-{k}"
    code = orm.InstalledCode(
        label=final,
        computer=computer,
        filepath_executable=str(executable),
        default_calc_job_plugin=plugin,
        description=description,
        with_mpi=False,  # serial on the embedded localhost: no mpirun (which refuses to run as root)
    )
    if executable.name == EXEC_NAME:
        # Heavy stages use a few threads; the CalcJob inherits no environment from the caller.
        code.prepend_text = f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{os.cpu_count() or 1}}}"
    return code.store()


def ensure_setup(profile_name: str | None = None, *, broker: str = "zeromq") -> SetupReport:
    """Profile, computer and codes, created only where missing."""
    profile, created, config_dir = load_or_create_profile(profile_name, broker=broker)
    computer = get_or_create_localhost(config_dir)
    messages = []
    codes = {}
    exe = executable_path()
    codes["automat"] = get_or_create_code(computer, EXEC_NAME, exe, None, "aiida-automat stage executable").full_label
    pw = shutil.which("pw.x")
    if pw:
        codes["pw"] = get_or_create_code(computer, "pw", pathlib.Path(pw), "quantumespresso.pw", "Quantum ESPRESSO pw.x").full_label
    else:
        messages.append("pw.x not found: the DFT check is unavailable (apt-get install quantum-espresso)")
    return SetupReport(profile.name, created, str(config_dir), computer.label, codes, tuple(messages))


def load_code(kind: str = "automat"):
    """The code for ``kind`` ('automat' or 'pw') on localhost, set up if needed."""
    from aiida import orm

    report = ensure_setup()
    if kind not in report.codes:
        raise LookupError(f"no {kind} code is configured: {'; '.join(report.messages)}")
    return orm.load_code(report.codes[kind])
