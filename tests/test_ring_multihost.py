"""Ring attention across two processes (jax.distributed, 4 CPU devices each, gloo collectives)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "multihost" / "ring_worker.py"


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ring_attention_across_two_processes():
    address = f"localhost:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    procs = [subprocess.Popen([sys.executable, str(WORKER), f"--coordinator={address}",
                               "--num_processes=2", f"--process_id={i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker did not finish in 240 s")
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
        assert f"process {i}: 4 local of 8 devices, max error" in out, out[-3000:]
