"""The learned expert (a small residual CNN) and the checkpoint that carries it and the gate.

Network: FFDNet-like — the image is pixel-unshuffled by 2 (4 channels at half resolution, 4× cheaper),
two constant side channels (estimated noise σ in normalised units, and an iDPC flag) are appended, then
``depth`` 3×3 conv layers (``channels`` wide, dilations 1-2-3-2-… for a ~3 Å receptive field at
0.1 Å/px) predict the noise, which is subtracted (residual learning, DnCNN). No normalisation layers, no
per-patch statistics: the network is a fixed function of the globally normalised image.

Checkpoint: one ``torch.save`` dict of tensors + plain config (loaded with ``weights_only=True``), plus a
JSON sidecar with the training config, the exact command and the file's sha256.
"""

from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass, field

import numpy as np

from ..hashing import file_sha256
from ..errors import AutomatError

RESOURCE_DIR = pathlib.Path(__file__).resolve().parents[1] / "resources" / "denoiser"
CHECKPOINT_NAME = "denoiser.pt"
CONFIG_NAME = "denoiser.json"
EXPERTS = ("cnn", "bragg", "gauss")
GATE_FEATURES = ("bias", "log10_sigma", "periodicity", "idpc")


class DenoiserError(AutomatError):
    """The denoiser checkpoint is missing, corrupt or does not match its recorded sha256."""


def build_network(channels: int = 32, depth: int = 7):
    import torch
    from torch import nn

    class SmallDnCNN(nn.Module):
        def __init__(self):
            super().__init__()
            dil = [1, 2, 3, 2, 3, 2, 1, 1, 1, 1][:depth]
            layers = [nn.Conv2d(4 + 2, channels, 3, padding=1), nn.ReLU(inplace=True)]
            for d in dil[1:-1]:
                layers += [nn.Conv2d(channels, channels, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(channels, 4, 3, padding=1)]
            self.body = nn.Sequential(*layers)
            self.down = nn.PixelUnshuffle(2)
            self.up = nn.PixelShuffle(2)

        def forward(self, x, sigma, idpc):
            # x: (B,1,H,W) with H, W even; sigma, idpc: (B,)
            z = self.down(x)
            b, _, h, w = z.shape
            side = torch.stack([sigma, idpc], 1)[:, :, None, None].expand(b, 2, h, w)
            noise = self.up(self.body(torch.cat([z, side], 1)))
            return x - noise

    return SmallDnCNN()


@dataclass(frozen=True, eq=False)
class DenoiserModel:
    """A loaded checkpoint: the network (eval mode) and the gate's weight matrix (experts × features)."""

    net: object
    gate_W: np.ndarray
    config: dict = field(default_factory=dict)
    sha256: str | None = None
    path: str | None = None

    @property
    def pixel_size_A(self) -> float:
        return float(self.config.get("model_pixel_A", 0.1))




def save_checkpoint(path, net, gate_W, config: dict) -> str:
    import torch

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    payload = {"state_dict": state, "gate_W": torch.as_tensor(np.asarray(gate_W, dtype=np.float64)),
               "arch": {"channels": int(config["channels"]), "depth": int(config["depth"])},
               "format": 1}
    torch.save(payload, path)
    return file_sha256(path)


def load_model(path=None, *, check_sha256: bool = True) -> DenoiserModel:
    """Load a checkpoint (default: the bundled one) and verify it against its JSON sidecar's sha256."""
    import torch

    path = pathlib.Path(path) if path is not None else RESOURCE_DIR / CHECKPOINT_NAME
    if not path.exists():
        raise DenoiserError(f"denoiser checkpoint {path} not found; train one with "
                            "`python -m aiida_automat.denoise.train --out DIR`")
    sidecar = path.with_suffix(".json")
    config = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    sha = file_sha256(path)
    if check_sha256 and config.get("sha256") and config["sha256"] != sha:
        raise DenoiserError(f"denoiser checkpoint {path} has sha256 {sha[:12]}…, but {sidecar.name} records "
                            f"{config['sha256'][:12]}…; the file is corrupt or was replaced")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        net = build_network(**payload["arch"])
        net.load_state_dict(payload["state_dict"])
    except Exception as exc:  # noqa: BLE001 - one message for every kind of broken file
        raise DenoiserError(f"cannot load denoiser checkpoint {path}: {exc}") from exc
    net.eval()
    gate_W = payload["gate_W"].numpy().astype(np.float64)
    return DenoiserModel(net=net, gate_W=gate_W, config=config, sha256=sha, path=str(path))


@functools.lru_cache(maxsize=2)
def _cached_default(path_str: str, mtime: float) -> DenoiserModel:
    return load_model(path_str)


def default_model() -> DenoiserModel:
    path = RESOURCE_DIR / CHECKPOINT_NAME
    if not path.exists():
        raise DenoiserError(f"the bundled denoiser checkpoint {path} is missing; reinstall the package or "
                            "train one with `python -m aiida_automat.denoise.train`")
    return _cached_default(str(path), path.stat().st_mtime)
