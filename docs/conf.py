"""Sphinx configuration: markdown pages through MyST, API pages from docstrings."""

project = "aiida-automat"
author = "aiida-automat developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_sections"]
myst_heading_anchors = 3
html_theme = "alabaster"
autodoc_mock_imports = []
suppress_warnings = ["myst.header"]
