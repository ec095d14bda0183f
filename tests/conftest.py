"""Test configuration shared by the whole suite.

AiiDA must never touch the developer's own configuration: ``AIIDA_PATH`` points to a temporary folder
before AiiDA is imported, and the session profile comes from ``aiida.tools.pytest_fixtures`` (SQLite, no
broker). Core tests do not request AiiDA fixtures and run without a database.
"""

from __future__ import annotations

import atexit
import functools
import os
import pathlib
import shutil
import tempfile

os.environ["AIIDA_PATH"] = tempfile.mkdtemp(prefix="automat-aiida-test-")
# one such folder per pytest run; remove it so that repeated runs do not fill the temporary directory
atexit.register(functools.partial(shutil.rmtree, os.environ["AIIDA_PATH"], ignore_errors=True))
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

pytest_plugins = ["aiida.tools.pytest_fixtures"]

DATA = pathlib.Path(__file__).parent / "data"
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """``../shared/data`` of a developer checkout; tests that need it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present (only developer checkouts and CI have it)")
    return SHARED


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(20260521)
