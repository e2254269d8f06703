"""The docs build with warnings as errors: MyST pages, the toctree, and the API reference that
autodoc generates from lcm's docstrings (a docstring that is not valid reStructuredText fails
here)."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PACKAGES = ("attention", "cache", "memory", "positions", "model", "io", "data", "eval", "train",
            "sharding", "config")


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stderr[-6000:]}"
    html = (tmp_path / "html" / "api" / "lcm.attention.html").read_text(encoding="utf-8")
    assert 'id="lcm.attention.attend"' in html  # autodoc ran and documented the entry point
    assert "new empty dictionary" not in html


@pytest.mark.parametrize("package", PACKAGES)
def test_api_page_lists_the_public_names(package):
    """Each public package has its page, and its summary table lists exactly `__all__`, in
    order, so the reference cannot drift from what the package exports."""
    module = importlib.import_module(f"lcm.{package}")
    page = (DOCS / "api" / f"lcm.{package}.md").read_text(encoding="utf-8")
    table = page.split(".. autosummary::", 1)[1].split(".. automodule::", 1)[0]
    listed = re.findall(r"^   (\w+)$", table, flags=re.M)
    assert listed == list(module.__all__)
    assert f".. automodule:: lcm.{package}\n" in page
    assert f"lcm.{package}\n" in (DOCS / "api" / "index.md").read_text(encoding="utf-8")


def test_lcm_has_a_module_docstring():
    import lcm

    assert lcm.__doc__ and "lcm.attention" in lcm.__doc__ and len(lcm.__doc__) > 500
    for package in PACKAGES:
        assert f"`lcm.{package}`" in lcm.__doc__, package
