"""Sphinx configuration of the neurovae documentation.

Build with ``make -C doc html`` (warnings are errors); the pages land in
``doc/_build/html``.
"""

import sys
from pathlib import Path

import neurovae

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "sphinxext"))

from offline_inventories import intersphinx_mapping as _intersphinx  # noqa: E402

project = "neurovae"
author = "The neurovae developers"
copyright = "2026, The neurovae developers"
release = neurovae.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = [
    "_build",
    "auto_examples/**/*.ipynb",
    "auto_examples/**/*.py",
    "auto_examples/**/*.zip",
    "auto_examples/**/*.json",
]

# API reference: one page per public name (doc/api.rst lists them).
autosummary_generate = True
templates_path = ["_templates"]
numpydoc_show_class_members = False

# Links to the documentation of the libraries we build on. The published
# inventories are tried first; without a network the build falls back to
# inventories derived from the installed packages (doc/sphinxext).
intersphinx_mapping = _intersphinx(HERE / "_build" / "inventories")
intersphinx_timeout = 10

# Markdown pages (benchmarks/README.md and CHANGELOG.md are included as they
# are, so the figures live in one place).
myst_heading_anchors = 3

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    # topic folders sort by name (01_, 02_, ...); examples within one by file
    # name, so the quick start comes first
    "within_subsection_order": "FileNameSortKey",
    "reference_url": {"neurovae": None},
    "backreferences_dir": "generated/backreferences",
    "doc_module": ("neurovae",),
    "remove_config_comments": True,
    "show_memory": False,
}

html_theme = "pydata_sphinx_theme"
html_title = f"neurovae {release}"
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {
    page: [] for page in ("index", "install", "quickstart", "benchmarks", "changelog")
}
