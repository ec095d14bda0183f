"""``automat-exec``: the package's own executable that CalcJobs run on any computer.

Each heavy stage is a sub-command reading ``parameters.json`` (and files next to it) from the working
directory and writing outputs plus ``status.json``. It never needs a database, so a cluster node with only
the package installed can run it. A core error is written to the status file (class name + message) and
the process exits 1; the parser maps the class to an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback

#: stage name → "module:function". Each function takes the parameters dict and returns a dict of results
#: (JSON-able) to merge into status.json; it writes its own output files into the working directory.
STAGES = {
    "simulate": "aiida_automat.cli.stage_simulate:run",
    "relax": "aiida_automat.cli.stage_relax:run",
    "denoise": "aiida_automat.cli.stage_denoise:run",
}


def _write_status(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
    import os

    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="automat-exec", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--parameters", default="parameters.json")
    parser.add_argument("--status", default="status.json")
    args = parser.parse_args(argv)

    from ..errors import AutomatError

    start = time.perf_counter()
    try:
        with open(args.parameters, encoding="utf8") as handle:
            parameters = json.load(handle)
        module_name, func_name = STAGES[args.stage].split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        results = func(parameters) or {}
    except AutomatError as exc:
        _write_status(args.status, {"ok": False, "error_class": type(exc).__name__, "message": str(exc)})
        print(f"automat-exec {args.stage}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _write_status(args.status, {"ok": False, "error_class": "AutomatError", "message": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: status file must always exist
        _write_status(args.status, {"ok": False, "error_class": "Unexpected", "message": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
        return 1
    _write_status(args.status, {"ok": True, "wall_time_s": time.perf_counter() - start, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
