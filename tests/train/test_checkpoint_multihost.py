"""Checkpoint fallback across two processes (jax.distributed, 2 CPU devices each, gloo, one
shared checkpoint directory): a corrupted latest checkpoint makes both processes resume from the
previous one with the same values, it is renamed once, and the step is saved anew; a checkpoint
one process cannot use is used by none (tests/multihost/checkpoint_worker.py)."""

from pathlib import Path

import pytest
from multihost_launch import run_processes

WORKER = Path(__file__).parents[1] / "multihost" / "checkpoint_worker.py"


@pytest.mark.slow
def test_two_processes_fall_back_to_the_same_intact_checkpoint(tmp_path):
    outputs = run_processes(WORKER, f"--root={tmp_path}", timeout_s=300)
    for i, out in enumerate(outputs):
        assert f"process {i}: resumed from step 2 with step 2's values" in out, out[-3000:]
        assert f"process {i}: saved step 3 anew and restored it" in out, out[-3000:]
        assert f"process {i}: with one host unable to read step 3, resumed from step 2" in out, \
            out[-3000:]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["1", "2", "3.corrupt", "3.corrupt1"], names
