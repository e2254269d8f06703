"""Packaging: the folder kernels/ installs as `lcm.kernels`, and nothing named `kernels` is
installed at the top level (it would collide with PyPI's unrelated `kernels` package)."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clean_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # what the install itself resolves, not the test runner's paths
    return env


@pytest.mark.slow
def test_wheel_installs_kernels_as_lcm_kernels(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools is needed to build the wheel offline: pip install -e '.[test]'")
    # Build from a copy, so that no stale build/ of the repository leaks into the wheel.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("lcm", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", str(src), "-w", str(out)],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("lcm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    assert "lcm/kernels/block_sparse/tpu.py" in names
    assert "lcm/kernels/ring/tpu.py" in names
    tops = {n.split("/")[0] for n in names}
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ in the wheel"
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lcm"}, tops
    # Every module of the repository ships (pyproject lists the packages explicitly).
    expected = {f"lcm/{p.relative_to(ROOT / 'lcm').as_posix()}"
                for p in (ROOT / "lcm").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"lcm/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}"
                 for p in (ROOT / "kernels").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (add the package to pyproject's packages): {missing}"


def test_no_top_level_kernels_resolves_into_the_repository(tmp_path):
    """Outside the repository root, `kernels` is not ours (absent, or another distribution's),
    while `lcm.kernels` resolves."""
    code = ("import importlib.util\n"
            "s = importlib.util.find_spec('kernels')\n"
            "print(s.origin if s else None)\n"
            "print(list(s.submodule_search_locations or []) if s else [])\n"
            "t = importlib.util.find_spec('lcm.kernels.block_sparse.tpu')\n"
            "print(t.origin if t else None)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    origin, locations, tpu = proc.stdout.splitlines()
    root = str(ROOT)
    assert not origin.startswith(root) and root not in locations, proc.stdout
    assert tpu != "None" and tpu.endswith("tpu.py"), proc.stdout
