"""``automat-exec denoise``: the mixture-of-experts denoiser on whatever computer runs the job.

Reads ``parameters.json``::

    {"setting": "auto", "keep_aperiodic": true,
     "image_file": "image.npz", "output_file": "denoised.npz",
     "model": {"path": "model_denoiser.pt", "sha256": "..."} | null}

The checkpoint's sha256 is compared with the one recorded on its node *before* torch sees the file, so
a corrupt or swapped copy fails as ``ChecksumMismatch`` (exit code 441) rather than as a confusing load
error or, worse, a result made with other weights. The training sidecar (``model_denoiser.json``, written
next to the checkpoint by the CalcJob) gives the model sampling. Writes the denoised image in the native
format and returns the report that is merged into ``status.json``.

The parameter check and the denoise-and-report step live here because the CalcJob spec and the
``denoise_image`` calcfunction import them: one rule set, one report format, wherever the job runs.
"""

from __future__ import annotations

import pathlib
import time

from ..errors import AutomatError, ChecksumMismatch

IMAGE_FILE = "image.npz"
OUTPUT_FILE = "denoised.npz"
MODEL_FILE = "model_denoiser.pt"
SIDECAR_FILE = "model_denoiser.json"

#: the keyword arguments of ``denoise.core.denoise`` a user may set, with their defaults
DEFAULTS = {"setting": "auto", "keep_aperiodic": True}
#: file names and the model the CalcJob adds to ``parameters.json``; not denoiser settings
RESERVED_KEYS = ("image_file", "output_file", "model")


def check_parameters(parameters: dict) -> dict:
    """Complete ``parameters`` with defaults and check them; raise ``AutomatError`` with one line."""
    from ..denoise.core import SETTINGS

    if not isinstance(parameters, dict):
        raise AutomatError(f"denoise parameters must be a dictionary, got {type(parameters).__name__}")
    unknown = sorted(set(parameters) - set(DEFAULTS) - set(RESERVED_KEYS))
    if unknown:
        raise AutomatError(f"unknown denoise parameter(s) {', '.join(unknown)}; allowed: {', '.join(DEFAULTS)} "
                           f"(setting: {' | '.join(SETTINGS)})")
    out = {**DEFAULTS, **parameters}
    if out["setting"] not in SETTINGS:
        raise AutomatError(f"denoise setting must be one of {', '.join(SETTINGS)}, got {out['setting']!r}")
    if not isinstance(out["keep_aperiodic"], bool):
        raise AutomatError(f"keep_aperiodic must be true or false, got {out['keep_aperiodic']!r}")
    return out


def load_checked_model(path, expected_sha256: str | None):
    """The denoiser at ``path``, after checking its bytes against ``expected_sha256``.

    ``ChecksumMismatch`` for another file, ``DenoiserError`` for one torch cannot load.
    """
    from ..denoise.model import DenoiserError, load_model
    from ..hashing import file_sha256

    path = pathlib.Path(path)
    if not path.is_file():
        raise DenoiserError(f"denoiser checkpoint {path.name} was not found in the working directory")
    sha = file_sha256(path)
    if expected_sha256 and sha != expected_sha256:
        raise ChecksumMismatch(f"{path.name} has sha256 {sha[:12]}…, its node records {expected_sha256[:12]}…")
    return load_model(path)


def denoise_with_report(image, model, parameters: dict):
    """(denoised ``StemImage``, JSON-able report): gate weights, noise before/after, timing, checkpoint."""
    from ..denoise.core import denoise, noise_sigma

    params = check_parameters(parameters)
    start = time.perf_counter()
    result = denoise(image, model=model, setting=params["setting"], keep_aperiodic=params["keep_aperiodic"])
    seconds = time.perf_counter() - start
    after = noise_sigma(result.image.data)
    report = {
        "setting": result.setting,
        "keep_aperiodic": params["keep_aperiodic"],
        "gate_weights": {k: float(v) for k, v in result.gate_weights.items()},
        "gate_features": {k: float(v) for k, v in result.features.items()},
        "noise_sigma_before": float(result.noise_sigma),
        "noise_sigma_after": float(after),
        "model_sha256": result.model_sha256,
        "shape": list(result.image.shape),
        "pixel_size_A": list(result.image.pixel_size_A),
        "denoise_seconds": seconds,
    }
    metadata = dict(result.image.metadata)
    # setting "none" returns the input untouched: the metadata still says so, and that no weights were used
    metadata["denoise"] = {"setting": result.setting, "model_sha256": result.model_sha256,
                           **metadata.get("denoise", {}), "noise_sigma_after": float(after)}
    return result.image.replace(metadata=metadata), report


def run(parameters: dict) -> dict:
    from ..denoise.model import default_model
    from ..imaging.io import load_stem_image, save_stem_image

    params = check_parameters(parameters)
    image = load_stem_image(params.get("image_file", IMAGE_FILE))
    spec = params.get("model")
    if spec:
        model = load_checked_model(spec.get("path", MODEL_FILE), spec.get("sha256"))
    else:
        model = default_model()
    denoised, report = denoise_with_report(image, model, {k: params[k] for k in DEFAULTS})
    save_stem_image(params.get("output_file", OUTPUT_FILE), denoised)
    print(f"automat-exec denoise: σ {report['noise_sigma_before']:.4g} → {report['noise_sigma_after']:.4g}; gate "
          + ", ".join(f"{k} {v:.2f}" for k, v in report["gate_weights"].items()), flush=True)
    return report
