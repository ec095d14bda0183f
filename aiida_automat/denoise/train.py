"""Reproducible training of the denoiser checkpoint (CNN expert + gate).

    python -m aiida_automat.denoise.train --out DIR [--n-images 400] [--steps 1500] [--seed 0] [--minutes 20]

``steps`` fixes the work done, so a run is bit-for-bit reproducible on CPU (one torch thread);
``minutes`` only caps the wall time as a safety net, and the config records the steps actually taken —
rerun with that ``--steps`` to reproduce a capped run. Writes ``DIR/denoiser.pt`` and ``DIR/denoiser.json``
(training config, command, timings, sha256).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

from .core import expert_outputs, features_of, noise_sigma, probe_band_limit_px, robust_normalisation
from .data import HELD_OUT_RULE, MODEL_PIXEL_A, make_pair, microscope_for, sample_case, training_structures
from .model import CHECKPOINT_NAME, CONFIG_NAME, EXPERTS, DenoiserModel, build_network, save_checkpoint

PATCH = 64


def make_dataset(n_images: int, seed: int, shape=(128, 128)):
    """Noisy/clean pairs at the model sampling, normalised by the *noisy* image's global statistics."""
    structures = training_structures()
    rng = np.random.default_rng(seed)
    xs, ys, sig, idp = [], [], [], []
    for _ in range(n_images):
        case = sample_case(rng, len(structures))
        p = make_pair(case, rng, shape=shape, structures=structures)
        off, scale = robust_normalisation(p.noisy)
        x = (p.noisy - off) / scale
        xs.append(x)
        ys.append((p.clean - off) / scale)
        sig.append(noise_sigma(x))
        idp.append(1.0 if p.mode == "idpc" else 0.0)
    return (np.stack(xs).astype(np.float32), np.stack(ys).astype(np.float32), np.array(sig, np.float32),
            np.array(idp, np.float32))


def train_cnn(data, *, steps: int, seed: int, batch: int = 16, lr: float = 2e-3, channels=32, depth=7,
              max_seconds: float | None = None, log=print):
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    X, Y, S, F = (torch.from_numpy(a) for a in data)
    n, H, W = X.shape
    net = build_network(channels=channels, depth=depth)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr * 0.05)
    g = np.random.default_rng(seed + 1)
    t0 = time.time()
    done = 0
    run = None
    for step in range(steps):
        idx = g.integers(n, size=batch)
        r = g.integers(0, H - PATCH + 1, size=batch)
        c = g.integers(0, W - PATCH + 1, size=batch)
        k = g.integers(4, size=batch)
        fl = g.integers(2, size=batch)
        xb, yb = [], []
        for i in range(batch):
            a = X[idx[i], r[i]:r[i] + PATCH, c[i]:c[i] + PATCH]
            b = Y[idx[i], r[i]:r[i] + PATCH, c[i]:c[i] + PATCH]
            a, b = torch.rot90(a, int(k[i])), torch.rot90(b, int(k[i]))
            if fl[i]:
                a, b = a.flip(1), b.flip(1)
            xb.append(a)
            yb.append(b)
        xb = torch.stack(xb)[:, None]
        yb = torch.stack(yb)[:, None]
        out = net(xb, S[idx], F[idx])
        loss = torch.mean((out - yb) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        lv = loss.item()
        run = lv if run is None else 0.98 * run + 0.02 * lv
        if step % 100 == 0:
            log(f"step {step} loss {run:.5f} ({time.time() - t0:.0f} s)")
        if max_seconds is not None and time.time() - t0 > max_seconds:
            log(f"time cap reached after {done} steps")
            break
    net.eval()
    return net, done, run


def _grad_err(B, C):
    """Mean squared error of the image gradients: errors that move column peaks, not just their heights."""
    db = B[..., 1:, :] - B[..., :-1, :], B[..., :, 1:] - B[..., :, :-1]
    dc = C[..., 1:, :] - C[..., :-1, :], C[..., :, 1:] - C[..., :, :-1]
    return sum(((a - b) ** 2).mean(dim=(-2, -1)) for a, b in zip(db, dc))


def fit_gate(net, n_images: int, seed: int, log=print, objective: str = "gradient"):
    """Fit the gate's softmax-linear weights on fresh simulated images.

    ``objective="gradient"`` (default) minimises the squared error of the blended image's *gradient*
    (per image, normalised by that image's raw error), a proxy for column-position error; ``"mse"`` the
    plain pixel MSE, which favours smooth blends that look good but move peaks less accurately.
    """
    import torch

    from ..imaging.image import StemImage
    from ..imaging.microscope import Microscope
    from .core import _measure

    structures = training_structures()
    rng = np.random.default_rng(seed + 7)
    model = DenoiserModel(net=net, gate_W=np.zeros((len(EXPERTS), 4)), config={"model_pixel_A": MODEL_PIXEL_A})
    feats, outs, cleans, avail = [], [], [], []
    for _ in range(n_images):
        case = sample_case(rng, len(structures))
        p = make_pair(case, rng, shape=(160, 160), structures=structures, undistorted_clean=True)
        off, scale = robust_normalisation(p.noisy)
        x = (p.noisy - off) / scale
        im = StemImage(data=p.noisy, pixel_size_A=MODEL_PIXEL_A, microscope=Microscope(mode=p.mode))
        lat = _measure(im)
        sig = noise_sigma(x)
        ex = expert_outputs(x, model, sig, p.mode == "idpc", lat,
                            kmax_px=probe_band_limit_px(microscope_for(case), MODEL_PIXEL_A))
        feats.append(features_of(sig, lat.periodicity if lat is not None else 0.0, p.mode == "idpc"))
        outs.append(np.stack([ex.get(e, np.zeros_like(x)) for e in EXPERTS]))
        avail.append([e in ex for e in EXPERTS])
        cleans.append((p.clean - off) / scale)
    Fe = torch.tensor(np.array(feats))
    O = torch.tensor(np.array(outs))[..., 8:-8, 8:-8]
    C = torch.tensor(np.array(cleans))[..., 8:-8, 8:-8]
    A = torch.tensor(np.array(avail))
    mse = ((O - C[:, None]) ** 2).mean(dim=(2, 3))
    log("expert MSE (mean over gate set): " + ", ".join(f"{e} {float(mse[A[:, i], i].mean()):.5f}"
                                                      for i, e in enumerate(EXPERTS)))
    W = torch.zeros((len(EXPERTS), Fe.shape[1]), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W], max_iter=300, line_search_fn="strong_wolfe")
    if objective == "gradient":
        ge = _grad_err(O, C[:, None])  # (n, experts)
        norm = ge.masked_fill(~A, float("inf")).min(1).values.clamp_min(1e-12)
        log("expert gradient error / best (mean): " + ", ".join(
            f"{e} {float((ge[A[:, i], i] / norm[A[:, i]]).mean()):.3f}" for i, e in enumerate(EXPERTS)))

    def closure():
        opt.zero_grad()
        logits = (Fe @ W.T).masked_fill(~A, -1e9)
        w = torch.softmax(logits, 1)
        blend = (w[:, :, None, None] * O).sum(1)
        if objective == "gradient":
            loss = (_grad_err(blend, C) / norm).mean() + 1e-4 * (W**2).sum()
        else:
            loss = ((blend - C) ** 2).mean() + 1e-4 * (W**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w = torch.softmax((Fe @ W.T).masked_fill(~A, -1e9), 1)
        blend = ((w[:, :, None, None] * O).sum(1) - C) ** 2
    log(f"gate blend MSE {float(blend.mean()):.5f}")
    return W.detach().numpy(), {e: float(mse[A[:, i], i].mean()) for i, e in enumerate(EXPERTS)}, float(blend.mean())


def train(out_dir, *, n_images: int = 400, steps: int = 1500, seed: int = 0, n_gate_images: int = 48,
          channels: int = 32, depth: int = 7, minutes: float | None = None, command: str | None = None,
          log=print) -> pathlib.Path:
    """Simulate training data, train the CNN expert and the gate, write checkpoint + config. Returns the path."""
    import torch

    torch.set_num_threads(1)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_dataset(n_images, seed)
    t_data = time.time() - t0
    log(f"{n_images} training images simulated in {t_data:.0f} s")
    budget = None if minutes is None else max(10.0, minutes * 60.0 - (time.time() - t0) - 60.0)
    net, done, last = train_cnn(data, steps=steps, seed=seed, channels=channels, depth=depth, max_seconds=budget,
                                log=log)
    t_train = time.time() - t0 - t_data
    W, expert_mse, blend_mse = fit_gate(net, n_gate_images, seed, log=log)
    config = {
        "model_pixel_A": MODEL_PIXEL_A,
        "channels": channels,
        "depth": depth,
        "n_images": n_images,
        "n_gate_images": n_gate_images,
        "steps_requested": steps,
        "steps": done,
        "seed": seed,
        "patch": PATCH,
        "final_loss": last,
        "gate_expert_mse": expert_mse,
        "gate_blend_mse": blend_mse,
        "experts": list(EXPERTS),
        "gate_features": ["bias", "log10_sigma", "periodicity", "idpc"],
        "data": "fastsim, iDPC+ADF, doses 1e3–1e5 e/Å² log-uniform, pixel 0.05–0.2 Å resampled to 0.1 Å, "
                "rotation 0–360°, defocus N(0, 20 Å), source 0–0.6 Å, 20–32 mrad, 60–300 kV, line jitter 0–0.4 px",
        "held_out": HELD_OUT_RULE,
        "gate_target": "clean image without scan jitter",
        "seconds_data": round(t_data, 1),
        "seconds_train": round(t_train, 1),
        "seconds_total": round(time.time() - t0, 1),
        "command": command or f"python -m aiida_automat.denoise.train --out {out} --n-images {n_images} "
                              f"--steps {done} --seed {seed}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    path = out / CHECKPOINT_NAME
    config["sha256"] = save_checkpoint(path, net, W, config)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {path} (sha256 {config['sha256']})")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-images", type=int, default=400)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-gate-images", type=int, default=48)
    ap.add_argument("--minutes", type=float, default=None, help="wall-time cap (the config records steps done)")
    args = ap.parse_args(argv)
    cmd = "python -m aiida_automat.denoise.train " + " ".join(sys.argv[1:] if argv is None else argv)
    train(args.out, n_images=args.n_images, steps=args.steps, seed=args.seed, n_gate_images=args.n_gate_images,
          minutes=args.minutes, command=cmd, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
