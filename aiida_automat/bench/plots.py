"""Figures of a benchmark run (``bench.run`` results dict) as PNG files next to ``report.md``.

Each ``*_figure`` function takes the results dict and returns a matplotlib ``Figure`` (or ``None`` when
the run has no data for it, e.g. no energies), so tests can inspect panels and labels without files;
``write_plots`` renders them with the Agg backend (no display needed on a cluster node).
"""

from __future__ import annotations

import pathlib

import numpy as np

__all__ = ["FIGURES", "energy_parity_figure", "rmsd_hist_figure", "success_vs_dose_figure", "write_plots"]

#: file name → (figure function name, caption used in report.md)
FIGURES = {
    "success_vs_dose.png": ("success_vs_dose_figure", "Success rate vs dose, per imaging mode and pipeline"),
    "rmsd_hist.png": ("rmsd_hist_figure", "Projected RMSD of the correct structures, per pipeline"),
    "energy_parity.png": ("energy_parity_figure", "Formation energy: ML on the pipeline's and on the true structure vs DFT"),
}

# line style, marker, marker size, filled: equal rates overlap, and each line stays visible
_STYLE = {"pipeline": "-", "workchain": "-.", "oracle_template": "--", "automat_baseline": ":"}
_MARKER = {"pipeline": ("o", 5, True), "workchain": ("D", 7, False), "oracle_template": ("s", 9, False),
           "automat_baseline": ("^", 6, True)}
_MODE_TITLE = {"idpc": "iDPC", "adf": "ADF", "haadf": "HAADF", "bf": "BF", "abf": "ABF"}


def _pipelines(results) -> list[str]:
    from .run import PIPELINES

    return [p for p in PIPELINES if p in results["summary"]]


def _new_figure(ncols: int, width: float = 4.2, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def success_vs_dose_figure(results):
    """One panel per mode: success rate (%) against dose (log axis), one line per pipeline."""
    modes = list(results["settings"]["modes"])
    names = _pipelines(results)
    fig, axes = _new_figure(len(modes))
    for ax, mode in zip(axes, modes):
        for name in names:
            groups = results["summary"][name]["by_mode_dose"]
            pts = sorted((float(key.split()[-1]), st["success_rate"]) for key, st in groups.items()
                         if key.split()[0] == mode and st["success_rate"] is not None)
            if pts:
                d, s = np.array(pts).T
                marker, size, filled = _MARKER.get(name, ("o", 5, True))
                ax.plot(d, 100 * s, marker=marker, markersize=size, linestyle=_STYLE.get(name, "-"), label=name,
                        zorder=3 if name in ("pipeline", "workchain") else 2, **({} if filled else {"markerfacecolor": "none"}))
        ax.set_xscale("log")
        doses = sorted(float(d) for d in results["settings"]["doses"])
        ax.set_xticks(doses, [f"{d:g}" for d in doses])
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.set_title(_MODE_TITLE.get(mode, mode))
        ax.set_xlabel("dose (e⁻/Å²)")
        ax.set_ylabel("success (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def rmsd_hist_figure(results):
    """Histogram of the projected RMSD (Å) of the successful rows, one step curve per pipeline."""
    names = _pipelines(results)
    values = {n: [r["rmsd_A"] for r in results["rows"] if r["pipeline"] == n and r.get("success")
                  and r.get("rmsd_A") is not None] for n in names}
    fig, (ax,) = _new_figure(1, width=5.0)
    allv = [v for vs in values.values() for v in vs]
    bins = np.linspace(0.0, max(0.05, 1.05 * max(allv)) if allv else 0.05, 26)
    for n in names:
        if values[n]:
            ax.hist(values[n], bins=bins, histtype="step", linewidth=1.5, linestyle=_STYLE.get(n, "-"),
                    label=f"{n} (n={len(values[n])})")
    ax.set_title("Projected RMSD of correct structures")
    ax.set_xlabel("projected RMSD (Å)")
    ax.set_ylabel("images")
    if allv:
        ax.legend(fontsize="small")
    return fig


def energy_parity_figure(results):
    """Two panels, ML against DFT formation energy (eV/atom): the pipeline's structure per image (right
    answers and wrong ones marked apart), and the true structure per structure (the potential's own error).
    ``None`` when the run has no energies."""
    from .run import product_pipeline

    product = product_pipeline(_pipelines(results))
    rows = [r for r in results["rows"] if r["pipeline"] == product and r.get("eform_dft") is not None]
    if not rows:
        rows = [r for r in results["rows"] if r["pipeline"] == "oracle_template" and r.get("eform_dft") is not None]
    if not rows or not results.get("energy"):
        return None
    fig, (ax_p, ax_o) = _new_figure(2)
    ok = [(r["eform_dft"], r["eform_ml"]) for r in rows if r.get("eform_ml") is not None and r.get("success")]
    bad = [(r["eform_dft"], r["eform_ml"]) for r in rows if r.get("eform_ml") is not None and not r.get("success")]
    oracle = {r["id"]: (r["eform_dft"], r["eform_oracle"]) for r in rows if r.get("eform_oracle") is not None}
    pts = ok + bad + list(oracle.values())
    lo, hi = (min(min(p) for p in pts), max(max(p) for p in pts)) if pts else (-1.0, 0.0)
    pad = 0.05 * (hi - lo or 1.0)
    e = results["energy"]
    for ax, title in ((ax_p, f"{rows[0]['pipeline']} structure"), (ax_o, "true structure (oracle)")):
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", linewidth=1)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_xlabel("DFT formation energy (eV/atom)")
        ax.set_ylabel(f"{e['potential']} formation energy (eV/atom)")
        ax.set_title(title)
    if ok:
        ax_p.scatter(*np.array(ok).T, s=14, label=f"correct structure (n={len(ok)})")
    if bad:
        ax_p.scatter(*np.array(bad).T, s=14, marker="x", color="C3", label=f"wrong structure (n={len(bad)})")
    if ok or bad:
        ax_p.legend(fontsize="small")
    if oracle:
        ax_o.scatter(*np.array(list(oracle.values())).T, s=14, color="C2", label=f"structures (n={len(oracle)})")
        ax_o.legend(fontsize="small")
    mae, mae_o = e["overall"].get("eform_mae_meV"), e["overall"].get("eform_oracle_mae_meV")
    if mae is not None:
        ax_p.set_title(f"{rows[0]['pipeline']} structure: MAE {mae:.0f} meV/atom")
    if mae_o is not None:
        ax_o.set_title(f"true structure (oracle): MAE {mae_o:.0f} meV/atom")
    return fig


def write_plots(results, out_dir) -> dict:
    """Write every figure that has data to ``out_dir``; returns {file name: caption} of those written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out_dir = pathlib.Path(out_dir)
    written = {}
    for fname, (func, caption) in FIGURES.items():
        fig = globals()[func](results)
        if fig is None:
            continue
        FigureCanvasAgg(fig)
        fig.savefig(out_dir / fname, dpi=110)
        written[fname] = caption
    return written
