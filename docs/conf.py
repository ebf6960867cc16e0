"""Sphinx configuration."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

with open(os.path.join(os.path.dirname(__file__), "..", "sb3_metacpo", "version.txt")) as file_handler:
    release = file_handler.read().strip()

project = "sb3-metacpo"
author = "sb3-metacpo developers"
version = release
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_parser"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "sphinx_rtd_theme"
exclude_patterns = ["_build"]
