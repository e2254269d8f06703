"""Ring attention across two processes (jax.distributed, 4 CPU devices each, gloo collectives)."""

from pathlib import Path

import pytest
from multihost_launch import run_processes

WORKER = Path(__file__).parents[1] / "multihost" / "ring_worker.py"


@pytest.mark.slow
def test_ring_attention_across_two_processes():
    outputs = run_processes(WORKER, timeout_s=240)
    for i, out in enumerate(outputs):
        assert f"process {i}: 4 local of 8 devices, max error" in out, out[-3000:]
