"""The picture a microscopist checks first: their image, the columns found, the cell, the odd columns."""

from __future__ import annotations

import pathlib

import numpy as np


def overlay_png(path, image, cell_vectors_px, species_check, title: str = "") -> pathlib.Path:
    """Columns coloured by site, flagged columns circled, one unit cell drawn near the centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    path = pathlib.Path(path)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    shown = ndimage.gaussian_filter(np.asarray(image.data, dtype=float), 0.25 / float(np.mean(image.pixel_size_A)))
    lo, hi = np.percentile(shown, [1, 99.5])
    ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    labels = species_check.site_labels
    colours = plt.cm.tab10(np.linspace(0, 1, 10))
    for j, label in enumerate(labels):
        pts = np.array([c.position_px for c in species_check.columns if c.site == j and not c.flag])
        if len(pts):
            ax.scatter(pts[:, 1], pts[:, 0], s=10, color=colours[j % 10], label=label, linewidths=0)
    flagged = np.array([c.position_px for c in species_check.flagged])
    if len(flagged):
        ax.scatter(flagged[:, 1], flagged[:, 0], s=60, facecolors="none", edgecolors="red", linewidths=1.2,
                   label="flagged column")
    V = np.asarray(cell_vectors_px, dtype=float)
    centre = np.array(image.shape, dtype=float) / 2.0
    o = np.round(centre @ np.linalg.inv(V)) @ V
    corners = np.array([o, o + V[0], o + V[0] + V[1], o + V[1], o])
    ax.plot(corners[:, 1], corners[:, 0], color="yellow", lw=1.5)
    ax.set_xlim(0, image.shape[1] - 1)
    ax.set_ylim(image.shape[0] - 1, 0)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.7)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
