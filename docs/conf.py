"""Sphinx configuration of the experiment_io documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` from the
repository root.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from experiment_io import __version__  # noqa: E402

project = "experiment_io"
author = "the experiment_io authors"
copyright = "the experiment_io authors"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
nitpicky = True
# names that are not Sphinx objects here (no intersphinx without a network)
nitpick_ignore_regex = [(r"py:.*", r"(torch|numpy|np|h5py|os|threading|signal|pickle|_pickle|enum|typing|collections|random|abc|mmap|ctypes)(\..*)?"),
                        (r"py:.*", r".*\._[A-Za-z]\w*")]  # private base classes

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "none"

html_theme = "alabaster"

# the bases of the Lightning integration's classes are documented by Lightning, not here
nitpick_ignore = globals().get("nitpick_ignore", []) + [
    ("py:class", "lightning.fabric.plugins.io.checkpoint_io.CheckpointIO"),
    ("py:class", "lightning.pytorch.callbacks.callback.Callback"),
]
