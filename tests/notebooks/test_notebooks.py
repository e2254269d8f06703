"""The notebooks under notebooks/ run top to bottom, as a reader runs them in Colab.

Each notebook is executed with nbclient in a fresh `python3` kernel (jupyter_client starts it
with this interpreter), from the notebook's own folder, with LCM_NOTEBOOK_CI=1 in its
environment (notebooks may read it to pick their smallest sizes) and the 8 simulated CPU devices
that conftest sets in XLA_FLAGS. A failure reports the failing cell's source and traceback.
Notebooks are committed without outputs: the cheap checks below keep it that way.

Each notebook runs in a child process (this file run as a script): the pytest worker never
imports nbclient's zmq/tornado stack, which shared a worker process with the JAX tests that
followed it and aborted one of them in XLA.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
EXPECTED = ("01_quickstart.ipynb", "02_long_context.ipynb", "03_kv_eviction.ipynb",
            "04_kernels_and_ring.ipynb")
CELL_TIMEOUT_S = 600  # per cell; a whole notebook is sized to run in a minute or two on a CPU
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _paths():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def test_expected_notebooks_exist():
    names = {p.name for p in _paths()}
    missing = [name for name in EXPECTED if name not in names]
    assert not missing, f"notebooks/ lacks {missing}; it holds {sorted(names)}"


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    """No outputs or execution counts in git; the first code cell is the install cell."""
    nb = _read(path)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; clear "
                       f"them before committing (notebooks are executed in CI, not stored run)")
    assert "pip" in code[0].source and "find_spec" in code[0].source, (
        f"{path.name}: the first code cell should be the install cell (pip install of lcm, a "
        f"no-op where lcm is installed); it is:\n{code[0].source}")


def _failure(nb, path: Path, error: Exception) -> str:
    """The failing cell's index, source and traceback (ANSI colours removed)."""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                trace = _ANSI.sub("", "\n".join(out.get("traceback", [])))
                return (f"{path.name}: cell {index} raised {out.get('ename')}: "
                        f"{out.get('evalue')}\n--- cell source ---\n{cell.source}\n"
                        f"--- traceback ---\n{trace}")
    return f"{path.name}: {type(error).__name__}: {_ANSI.sub('', str(error))}"


def execute(path: Path) -> str | None:
    """Runs the notebook in a fresh kernel; None when every cell ran, else the failure."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = _read(path)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        return _failure(nb, path, e)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    return _failure(nb, path, RuntimeError("error output")) if errors else None


@pytest.mark.slow
@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("LCM_NOTEBOOK_CI", "1")
    assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path)],
                          capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        pytest.fail(f"{done.stdout}\n{done.stderr[-4000:]}", pytrace=False)


if __name__ == "__main__":
    failure = execute(Path(sys.argv[1]))
    if failure:
        print(failure)
        sys.exit(1)
