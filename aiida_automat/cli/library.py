"""``aiida-automat library build|list|show`` and the library lookup used by ``reconstruct``.

A library is simulated for particular optics, so the reconstruction of an image uses a library built for
that image's mode, voltage and semiangle: the bundled one is built on first use for new optics (about a
minute on two cores) and reused afterwards, because ``get_or_build`` finds a stored library whose inputs
hash the same.
"""

from __future__ import annotations

import click

from .common import user_errors


def _progress_builder(label: str):
    """A click progress bar driven by the builder's ``progress(done, total)`` callback."""
    state = {"bar": None, "done": 0}

    def progress(done, total):
        if state["bar"] is None:
            state["bar"] = click.progressbar(length=total, label=label, file=click.get_text_stream("stderr"))
            state["bar"].__enter__()
        state["bar"].update(done - state["done"])
        state["done"] = done
        if done >= total:
            state["bar"].__exit__(None, None, None)

    return progress


def library_for_image(image, name: str | None = None, echo=click.echo):
    """The named library, or the bundled library built for ``image``'s optics (built only once)."""
    from ..data.library import TemplateLibraryData, get_or_build

    if name:
        return TemplateLibraryData.from_name(name)
    m = image.microscope
    mode = "adf" if m.mode == "haadf" else m.mode
    node = get_or_build(None, name=f"bundled-{mode}-{m.voltage_kV:g}kV-{m.semiangle_mrad:g}mrad", modes=(mode,),
                        microscope=m.replace(mode=mode) if mode != m.mode else m,
                        progress=_progress_builder("building template library"))
    echo(f"library {node.name}: {node.base.attributes.get('n_templates', '?')} templates (sha256 {node.sha256[:12]})")
    return node


@click.group("library")
def library_group():
    """Template libraries: simulated images and descriptors of known 2D structures."""


@library_group.command("build")
@click.option("--structures", "paths", multiple=True, type=click.Path(exists=True),
              help="extxyz/CIF file or folder (repeatable); default: the bundled 2DMatPedia + MC2D set.")
@click.option("--name", required=True, help="Library name.")
@click.option("--modes", default="idpc,adf", show_default=True, help="Imaging modes to simulate, comma separated.")
@click.option("--voltage", "voltage_kV", type=float, default=300.0, show_default=True, help="kV.")
@click.option("--semiangle", "semiangle_mrad", type=float, default=25.0, show_default=True, help="mrad.")
@user_errors
def build(paths, name, modes, voltage_kV, semiangle_mrad):
    """Build (or find, if identical inputs were built before) a template library."""
    from ..data.library import get_or_build
    from ..profile import ensure_setup

    ensure_setup()
    node = get_or_build(list(paths) or None, name=name, modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
                        voltage_kV=voltage_kV, semiangle_mrad=semiangle_mrad, progress=_progress_builder(f"building {name}"))
    click.echo(f"library {node.name}: {node.base.attributes.get('n_templates')} templates, node {node.pk}, sha256 {node.sha256}")


@library_group.command("list")
@user_errors
def list_libraries():
    """List stored template libraries."""
    from ..data.library import TemplateLibraryData
    from ..profile import ensure_setup

    ensure_setup()
    rows = TemplateLibraryData.list_libraries()
    if not rows:
        click.echo("no libraries yet: `aiida-automat library build --name NAME` (reconstruct builds one on first use)")
    for node in rows:
        attrs = node.base.attributes
        click.echo(f"{node.pk:>6}  {node.name:<40} {attrs.get('n_templates', '?'):>5} templates  "
                   f"modes {','.join(attrs.get('modes', []))}  {node.ctime:%Y-%m-%d %H:%M}")


@library_group.command("show")
@click.argument("name")
@user_errors
def show(name):
    """Details of library NAME."""
    from ..data.library import TemplateLibraryData
    from ..profile import ensure_setup

    ensure_setup()
    node = TemplateLibraryData.from_name(name)
    attrs = dict(node.base.attributes.all)
    attrs.pop("structure_uuids", None)
    for key in sorted(attrs):
        click.echo(f"{key:>16}: {attrs[key]}")
