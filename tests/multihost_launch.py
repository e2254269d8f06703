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
    # The checkout (lcm) and tests/ (this module's start_worker) for the workers.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]),
                                         str(Path(__file__).parent)])
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


def start_worker(local_devices: int = 2, *, root: bool = True):
    """In a worker script, before anything imports JAX: parses --coordinator, --num_processes,
    --process_id (and --root, or --local_devices when local_devices is None), gives this
    process CPU devices talking over gloo, joins the jax.distributed job, and returns the
    parsed arguments."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--process_id", type=int, required=True)
    if root:
        parser.add_argument("--root", required=True)
    if local_devices is None:
        parser.add_argument("--local_devices", type=int, default=4)
    args = parser.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_num_cpu_devices", args.local_devices if local_devices is None
                      else local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               initialization_timeout=60)
    return args
