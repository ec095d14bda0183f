"""Is the profile's storage consistent after failures, restarts and refusals?

AiiDA 2.9's ``verdi storage integrity`` group has no checks yet, so this runs the storage's own: every
repository object a node references exists, links join existing nodes, and no process is left unfinished
or unsealed (which would mean a crash stored half a result, or a worker died mid-step unnoticed).
"""

from __future__ import annotations

import pathlib
import sqlite3


def storage_problems(*, allow_active: bool = False) -> list[str]:
    """Human-readable problems of the loaded profile's storage; empty when consistent."""
    from aiida import orm
    from aiida.manage import get_manager

    problems = []
    storage = get_manager().get_profile_storage()
    try:
        storage.get_unreferenced_keyset(check_consistency=True)
    except Exception as exc:  # noqa: BLE001 - the check raises whatever the repository backend raises
        problems.append(f"repository: {exc}")
    filepath = storage.profile.storage_config.get("filepath")
    database = pathlib.Path(filepath) / "database.sqlite" if filepath else None
    if database is not None and database.exists():
        with sqlite3.connect(database) as connection:
            dangling = connection.execute(
                "SELECT count(*) FROM db_dblink WHERE input_id NOT IN (SELECT id FROM db_dbnode) "
                "OR output_id NOT IN (SELECT id FROM db_dbnode)").fetchone()[0]
        if dangling:
            problems.append(f"{dangling} link(s) point at missing nodes")
    if not allow_active:
        unfinished = orm.QueryBuilder().append(orm.ProcessNode, filters={
            "attributes.process_state": {"!in": ["finished", "excepted", "killed"]}}, project="id").all(flat=True)
        if unfinished:
            problems.append(f"processes not terminated: {sorted(unfinished)}")
        unsealed = [pk for pk, sealed in orm.QueryBuilder().append(
            orm.ProcessNode, project=["id", "attributes.sealed"]).all() if not sealed]
        if unsealed:
            problems.append(f"processes not sealed: {sorted(unsealed)}")
    return problems
