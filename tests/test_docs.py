"""The documentation builds without warnings (autodoc imports every documented module)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sphinx_builds_without_warnings(tmp_path):
    sphinx = pathlib.Path(sys.executable).with_name("sphinx-build")
    if not sphinx.exists():
        pytest.skip("sphinx is not installed (pip install .[docs])")
    out = subprocess.run([str(sphinx), "-W", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
