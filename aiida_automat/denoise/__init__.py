"""Denoising of atomic-resolution STEM images: a mixture of experts (CNN, Bragg filter, Gaussian) and a gate.

Core API: ``denoise(image, model=None, setting="auto", keep_aperiodic=True) -> DenoiseResult``;
``load_model(path)`` loads (and sha256-checks) a checkpoint; ``train.train(out_dir, ...)`` makes one.
"""

from .core import SETTINGS, DenoiseResult, denoise, noise_sigma
from .model import DenoiserError, DenoiserModel, default_model, load_model

__all__ = ["SETTINGS", "DenoiseResult", "DenoiserError", "DenoiserModel", "default_model", "denoise", "load_model",
           "noise_sigma"]
