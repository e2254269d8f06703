"""The experiment runner: override checks, workdir resume rules, mesh checks, end to end."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from experiments import run as runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**fields):
    config = ml_collections.ConfigDict()
    config.experiment = "train"
    config.num_steps = 3
    config.model = ml_collections.ConfigDict({"num_layers": 2, "hidden_size": 32})
    config.update(fields)
    return config


def test_unknown_override_names_closest_fields():
    config = _config()
    assert runner.unknown_override(config, "num_steps") is None
    assert runner.unknown_override(config, "model.num_layers") is None
    msg = runner.unknown_override(config, "num_step")
    assert "did you mean --config.num_steps?" in msg and "valid fields:" in msg
    msg = runner.unknown_override(config, "model.num_layer")
    assert "config.model has no field 'num_layer'" in msg
    assert "--config.model.num_layers" in msg
    msg = runner.unknown_override(config, "num_steps.x")
    assert "is not a group" in msg


def test_every_config_file_loads_and_names_its_experiment():
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                   if f.endswith(".py") and not f.startswith("_"))
    assert names, "configs/ is empty"
    for name in names:
        config = runner.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
        assert config.experiment, name
        assert os.path.isfile(os.path.join(ROOT, "experiments", f"{config.experiment}.py")), name


def test_workdir_resume_rules(tmp_path):
    workdir = str(tmp_path / "run")
    config = _config()
    assert runner.prepare_workdir(workdir, config) is False
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["num_steps"] == 3
    open(os.path.join(workdir, "metrics.csv"), "w").close()
    assert runner.prepare_workdir(workdir, config) is True  # same config: resume
    changed = _config(num_steps=5)
    with pytest.raises(ValueError, match=r"different config \(num_steps: 3 -> 5\).*--overwrite"):
        runner.prepare_workdir(workdir, changed)
    assert runner.prepare_workdir(workdir, changed, allow_config_change=True) is True
    kept = [f for f in os.listdir(workdir) if f.startswith("config.") and f != "config.json"]
    assert len(kept) == 1 and os.path.exists(os.path.join(workdir, "metrics.csv"))
    assert runner.prepare_workdir(workdir, config, overwrite=True) is False
    assert sorted(os.listdir(workdir)) == ["config.json"]


def test_workdir_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an lcm run directory"):
        runner.prepare_workdir(str(tmp_path), _config(), overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_mesh_and_experiment_checks():
    runner.check_mesh(_config(mesh=(2, 2, 2, 1)), 8)
    with pytest.raises(ValueError, match=r"needs 4 devices, have 8"):
        runner.check_mesh(_config(mesh=(2, 2, 1, 1)), 8)
    with pytest.raises(ValueError, match=r"no module experiments/trian.py; did you mean train"):
        runner.experiment_module("trian")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_command_line_rejects_unknown_field_without_traceback(tmp_path):
    out = _run("--config=configs/train_tiny.py", "--config.num_step=2",
               f"--workdir={tmp_path / 'w'}")
    assert out.returncode != 0
    assert "did you mean --config.num_steps?" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()
