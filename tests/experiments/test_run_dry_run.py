"""`experiments.run --dry_run`: resolves and checks a config as a run does before any work,
prints it, and runs and writes nothing (the docs' command lines are validated with it)."""

import json
import os
import subprocess
import sys

import pytest

from experiments import run as runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWEEP = os.path.join(ROOT, "configs", "longctx_sweep.py")


def _dry(*args):
    return subprocess.run([sys.executable, "-m", "experiments.run", "--dry_run", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    workdir = tmp_path / "sweep"
    proc = _dry(f"--config={SWEEP}", f"--workdir={workdir}", "--config.num_samples=7",
                "--config.lengths=(1024,2048)")
    assert proc.returncode == 0, proc.stderr
    text, last = proc.stdout.rsplit("\n}\n", 1)
    config = json.loads(text + "\n}")
    assert config["num_samples"] == 7 and config["lengths"] == [1024, 2048]
    assert config["experiment"] == "longctx_sweep"
    assert "would start afresh" in last and "nothing was run or written" in last
    assert not workdir.exists()


def test_dry_run_runs_the_experiments_own_check(tmp_path):
    proc = _dry(f"--config={SWEEP}", f"--workdir={tmp_path / 'w'}", "--config.num_samples=0")
    assert proc.returncode != 0
    assert "num_samples" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_dry_run_checks_the_mesh_against_the_devices(tmp_path):
    config = runner.load_config_file(os.path.join(ROOT, "configs", "train_tiny.py"))
    config.mesh = (1, 3, 1, 1)  # 3 devices; the tests have 8
    with pytest.raises(ValueError, match="config.mesh"):
        runner.dry_run(config, str(tmp_path / "w"))
    config.mesh = (2, 2, 2, 1)
    assert "would start afresh" in runner.dry_run(config, str(tmp_path / "w"))
    # A multi-host run's mesh spans hosts: only reported, never initialised in a dry run.
    config.mesh = (1, 3, 1, 1)
    assert "jax.distributed.initialize()" in runner.dry_run(config, str(tmp_path / "w"),
                                                            distributed=True)


def test_dry_run_checks_the_workdir_and_leaves_it_unchanged(tmp_path):
    config = runner.load_config_file(os.path.join(ROOT, "configs", "train_tiny.py"))
    workdir = tmp_path / "w"
    runner.prepare_workdir(str(workdir), config)
    (workdir / "metrics.jsonl").write_text("{}\n")  # a result: the workdir is a run's
    before = sorted(os.listdir(workdir)), (workdir / "config.json").read_text()
    assert "would resume" in runner.dry_run(config, str(workdir))
    config.num_steps = config.num_steps + 1
    with pytest.raises(ValueError, match="different config"):
        runner.dry_run(config, str(workdir))
    assert "would resume" in runner.dry_run(config, str(workdir), allow_config_change=True)
    assert "would start afresh" in runner.dry_run(config, str(workdir), overwrite=True)
    assert (sorted(os.listdir(workdir)), (workdir / "config.json").read_text()) == before
