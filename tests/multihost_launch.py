"""Launch a tests/multihost worker script as N local processes of one jax.distributed job."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(worker: Path, *args: str, num_processes: int = 2,
                  timeout_s: int = 300) -> list[str]:
    """Each process's output (stdout and stderr) after all exited 0; fails the test when one
    fails or does not finish in timeout_s (then every process is killed)."""
    address = f"localhost:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    procs = [subprocess.Popen([sys.executable, str(worker), f"--coordinator={address}",
                               f"--num_processes={num_processes}", f"--process_id={i}", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a worker did not finish in {timeout_s} s")
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    return outputs
