# SPDX-License-Identifier: Apache-2.0
"""Sphinx configuration for the pyro_ebm site."""

project = "pyro_ebm"
author = "the pyro_ebm developers"
copyright = "2026, the pyro_ebm developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath"]
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "none"
# the Lightning adapter documents without the optional extra installed
autodoc_mock_imports = ["lightning"]
html_theme = "alabaster"
nitpicky = False
suppress_warnings = ["myst.header"]
