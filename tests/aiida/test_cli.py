"""The command line as a user meets it: embedded profile, one-line errors, entry points.

Each test runs the real console scripts in a subprocess with its own ``AIIDA_PATH``, so the embedded
default profile is created from scratch exactly as on a new machine.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

BIN = pathlib.Path(sys.executable).parent


def run(args, tmp_path, timeout=300):
    env = {**os.environ, "AIIDA_PATH": str(tmp_path / "config")}
    env.pop("AUTOMAT_DEBUG", None)
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    first = run([BIN / "aiida-automat", "setup"], tmp)
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    return tmp, first


def test_setup_is_idempotent(home):
    tmp, first = home
    second = run([BIN / "aiida-automat", "setup"], tmp)
    assert second.returncode == 0, second.stderr
    assert "using existing" in second.stdout
    code_line = [line for line in second.stdout.splitlines() if "(automat)" in line]
    assert code_line and "automat-exec@localhost" in code_line[0]
    assert (tmp / "config" / ".aiida").is_dir()


def test_plugins_are_registered(home):
    tmp, _ = home
    out = run([BIN / "verdi", "plugin", "list", "aiida.calculations"], tmp)
    assert "automat.simulate" in out.stdout and "automat.relax" in out.stdout
    out = run([BIN / "verdi", "plugin", "list", "aiida.workflows"], tmp)
    assert "automat.reconstruction" in out.stdout


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda p: p.write_bytes(b""), [], "empty"),
        (lambda p: p.write_bytes(b"\x00" * 100), ["--pixel-size", "0.1"], ""),
        (lambda p: np.save(p, np.ones((64, 64))), ["--pixel-size", "0.1"], "blank"),
        (lambda p: np.save(p, np.random.default_rng(0).random((64, 64))), [], "pixel size"),
        (lambda p: np.save(p, np.random.default_rng(0).random((64, 64))), ["--pixel-size", "0.1", "--elements", "Mo,Xx"], "not a chemical element"),
    ],
    ids=["empty-file", "garbage", "blank", "no-calibration", "unknown-element"],
)
def test_bad_input_gives_one_line_error(home, make, args, message):
    tmp, _ = home
    name = "bad.npy"
    make(tmp / name)
    out = run([BIN / "aiida-automat", "reconstruct", name, "--no-relax", *args], tmp)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert err and err[-1].startswith("Error:"), out.stderr
    assert "Traceback" not in out.stderr
    assert message in err[-1]


def test_pixel_size_tolerance_out_of_range_is_a_usage_error(home):
    tmp, _ = home
    np.save(tmp / "img.npy", np.random.default_rng(0).random((64, 64)))
    out = run([BIN / "aiida-automat", "reconstruct", "img.npy", "--pixel-size-tolerance", "0.5"], tmp)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--pixel-size-tolerance" in out.stderr.strip().splitlines()[-1]


def test_simulate_command(home):
    tmp, _ = home
    from ase.build import mx2

    mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19, vacuum=10).write(tmp / "mos2.cif")
    out = run([BIN / "aiida-automat", "simulate", "mos2.cif", "--method", "fast", "--size", "64", "--dose", "1e4",
               "-o", "img.npz"], tmp)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["shape"] == [64, 64] and summary["formula"] == "MoS2"
    assert (tmp / "img.npz").exists()


def test_denoise_command_through_calcjob(home):
    tmp, _ = home
    from ase.build import mx2

    from aiida_automat.imaging.fastsim import fast_image
    from aiida_automat.imaging.io import save_stem_image
    from aiida_automat.imaging.microscope import Microscope

    atoms = mx2(formula="MoS2", kind="2H", a=3.18, thickness=3.19)
    noisy = fast_image(atoms, Microscope(mode="adf", voltage_kV=80.0), 0.1, (64, 64), 10.0, dose_e_per_A2=3e3,
                       rng=np.random.default_rng(1))
    save_stem_image(tmp / "noisy.npz", noisy)
    out = run([BIN / "aiida-automat", "denoise", "noisy.npz", "--calcjob", "-o", "clean.npz"], tmp)
    assert out.returncode == 0, out.stderr
    assert "process " in out.stdout and (tmp / "clean.npz").exists()
    pk = out.stdout.rsplit("process ", 1)[1].split()[0]
    shown = run([BIN / "verdi", "process", "show", pk], tmp)
    assert "DenoiseCalculation" in shown.stdout and "Finished [0]" in shown.stdout


@pytest.mark.parametrize("example, expect", [("simulate_mos2.py", "SimulateCalculation<"),
                                             ("denoise_image.py", "exit status 0")])
def test_examples_run_with_verdi_run(home, example, expect):
    tmp, _ = home
    script = pathlib.Path(__file__).resolve().parents[2] / "examples" / example
    out = run([BIN / "verdi", "run", script], tmp)
    assert out.returncode == 0, out.stdout + out.stderr
    assert expect in out.stdout
