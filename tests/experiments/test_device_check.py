"""experiments/device_check: exits 0 saying so without an accelerator; its timing path (forced
onto the CPU, tiny) checks every implementation against the reference and prints the table."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_check(*args, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "experiments.device_check", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_without_an_accelerator_it_says_so_and_exits_0():
    done = run_check()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no GPU or TPU visible" in done.stdout
    assert "|" not in done.stdout  # nothing was timed


@pytest.mark.slow
def test_cpu_smoke_checks_times_and_rings():
    done = run_check("--cpu_smoke", "--lengths=128", "--repeats=1", "--check_length=128",
                     devices=2)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    check = next(line for line in out.splitlines() if line.startswith("reference check"))
    assert check.count(": ok") == 6, check  # 3 implementations x 2 masks
    rows = [line for line in out.splitlines() if line.startswith("| 128 |")]
    assert len(rows) == 4, out  # 2 masks x (fwd, fwd+bwd)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        times = [float(c) for c in cells[3:6]]  # every implementation timed, none skipped
        assert all(t > 0 for t in times), row
        assert cells[6].endswith("x") and cells[7].endswith("x"), row
    assert "ring over 2 device(s)" in out and "ring / pallas" in out
