"""Sphinx configuration."""

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(".."))

with open(os.path.join(os.path.dirname(__file__), "..", "sb3_metacpo", "version.txt")) as file_handler:
    release = file_handler.read().strip()

project = "sb3-metacpo"
author = "sb3-metacpo developers"
version = release
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "myst_parser",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "sphinx_rtd_theme"
exclude_patterns = ["_build", "_intersphinx"]

# Links into the docs of the libraries this package builds on. The build never touches the network (CI has none):
# each project's inventory is read from docs/_intersphinx/<name>.inv, committed, refreshed with
# `make docs-inventories`. A project whose inventory file is absent is left out (its names stay plain text) unless
# SB3_METACPO_DOCS_ONLINE=1, which fetches it from the project's site instead.
INTERSPHINX_PROJECTS = {
    "stable_baselines3": "https://stable-baselines3.readthedocs.io/en/master/",
    "gymnasium": "https://gymnasium.farama.org/",
    "torch": "https://docs.pytorch.org/docs/stable/",
    "numpy": "https://numpy.org/doc/stable/",
    "python": "https://docs.python.org/3/",
}
_INVENTORIES = Path(__file__).resolve().parent / "_intersphinx"
_ONLINE = os.environ.get("SB3_METACPO_DOCS_ONLINE") == "1"
intersphinx_mapping = {
    name: (url, str(_INVENTORIES / f"{name}.inv") if (_INVENTORIES / f"{name}.inv").is_file() else None)
    for name, url in INTERSPHINX_PROJECTS.items()
    if _ONLINE or (_INVENTORIES / f"{name}.inv").is_file()
}
intersphinx_timeout = 10
