"""Sphinx configuration: MyST Markdown pages and an API reference generated from the docstrings.

Build: `sphinx-build -W --keep-going docs docs/_build/html` (tests/docs/test_docs.py builds it
with warnings as errors).
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # lcm and experiments from the checkout

project = "lcm"
author = "the lcm authors"
copyright = "the lcm authors"  # noqa: A001 (Sphinx's name)

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]

# Docstrings write `name` for code: render it as code, not as a cross-reference to resolve.
default_role = "code"

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # links like evaluation.md#the-main-job-... resolve

autosummary_generate = False  # one page per package (docs/api/*.md), no per-object stubs
autodoc_default_options = {"members": True, "imported-members": True, "undoc-members": True,
                           "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = False

html_theme = "alabaster"  # ships with Sphinx
html_title = "lcm"
html_static_path = []

# Markdown pages link to repository files (configs/, experiments/, notebooks/) that are not
# part of the docs; those links are fine in the rendered pages and on GitHub.
suppress_warnings = ["myst.xref_missing"]

# Pages the index lists that may not be written yet: a toctree line naming one of them is
# dropped while its file is missing (see _drop_missing_optional_pages).
OPTIONAL_PAGES = ("likelihood", "answer")


def _drop_builtin_docstrings(app, what, name, obj, options, lines):
    """A module constant (a dict, tuple, int) has no docstring of its own: Python hands autodoc
    its type's ("dict() -> new empty dictionary ..."), which says nothing about lcm."""
    doc = getattr(type(obj), "__doc__", None)
    text = "\n".join(lines).strip()
    if what in ("data", "attribute") and isinstance(doc, str) and text == doc.strip():
        lines.clear()


def _drop_missing_optional_pages(app, docname, source):
    if docname != "index":
        return
    here = os.path.dirname(os.path.abspath(__file__))
    missing = {p for p in OPTIONAL_PAGES if not os.path.exists(os.path.join(here, p + ".md"))}
    source[0] = "\n".join(line for line in source[0].split("\n") if line.strip() not in missing)


def setup(app):
    app.connect("autodoc-process-docstring", _drop_builtin_docstrings)
    app.connect("source-read", _drop_missing_optional_pages)
