"""The bad-input catalogue of the runner (experiments/run.py, experiments/workdir.py) and the
experiments' config checks: every case a row with what it must do (`error`: a ValueError whose
message (or absl's UsageError for a flag) matches, naming the flag, field or file, which the
command line prints as one `error:` line; `ok`: a correct result). Case ids (or test names)
start with the kind, so docs/reliability.md counts them from `pytest --collect-only -q`.
Every config error is raised before a model is built.
"""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from absl import app

from configs.finetune_longctx import get_config as finetune_config
from configs.longctx_sweep import get_config as sweep_config
from configs.memory_recall import get_config as memory_config
from experiments import finetune_longctx, longctx_sweep, memory_recall
from experiments import run as runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_TINY = os.path.join(ROOT, "configs", "train_tiny.py")


def _config(**fields):
    config = ml_collections.ConfigDict({"experiment": "train", "num_steps": 3})
    config.update(fields)
    return config


def _workdir_with_results(tmp, config_json=None):
    workdir = os.path.join(tmp, "w")
    runner.prepare_workdir(workdir, _config())
    open(os.path.join(workdir, "metrics.csv"), "w").write("step,loss\n1,0.5\n")
    if config_json is not None:
        open(os.path.join(workdir, "config.json"), "w").write(config_json)
    return workdir


def _config_file(tmp, text):
    path = os.path.join(tmp, "c.py")
    open(path, "w").write(text)
    return path


def _read_only(tmp, monkeypatch):
    workdir = os.path.join(tmp, "ro")
    os.makedirs(workdir)
    os.chmod(workdir, 0o555)
    if os.geteuid() == 0:  # root writes anyway: fail the write as a read-only directory would

        def refuse(path, *args, **kw):
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(runner.os, "makedirs", refuse)
    return workdir


def _override(config, field, value):
    node = config
    *groups, last = field.split(".")
    for g in groups:
        node = node[g]
    node[last] = value
    return config


RUNNER_ERRORS = [  # (id, call(tmp, monkeypatch), message)
    ("missing --config file", lambda tmp, mp: runner.check_overrides(
        [f"--config={tmp}/none.py"]), r"--config='.*none.py' is not a file"),
    ("--config syntax error", lambda tmp, mp: runner.check_overrides(
        [f"--config={_config_file(tmp, 'def get_config(:')}"]), r"c.py': line 1: "),
    ("--config without get_config", lambda tmp, mp: runner.check_overrides(
        [f"--config={_config_file(tmp, 'x = 1')}"]), r"c.py' defines no get_config\(\)"),
    ("unknown --config.field", lambda tmp, mp: runner.check_overrides(
        [f"--config={TRAIN_TINY}", "--config.num_step=2"]),
     r"did you mean --config.num_steps\?"),
    ("workdir is a file", lambda tmp, mp: runner.prepare_workdir(
        _config_file(tmp, ""), _config()), r"--workdir='.*c.py' is a file"),
    ("read-only workdir", lambda tmp, mp: runner.prepare_workdir(
        _read_only(tmp, mp), _config()), r"--workdir='.*ro' is not writable \(Permission"),
    ("workdir under a file", lambda tmp, mp: runner.prepare_workdir(
        os.path.join(_config_file(tmp, ""), "w"), _config()), r"is not writable"),
    ("workdir of something else", lambda tmp, mp: runner.prepare_workdir(
        os.path.dirname(_config_file(tmp, "")), _config()), r"not an lcm run directory"),
    ("different config over results", lambda tmp, mp: runner.prepare_workdir(
        _workdir_with_results(tmp), _config(num_steps=5)),
     r"different config \(num_steps: 3 -> 5\)"),
    ("empty config.json", lambda tmp, mp: runner.prepare_workdir(
        _workdir_with_results(tmp, ""), _config()),
     r"w/config.json is unreadable \(Expecting value"),
    ("garbage config.json", lambda tmp, mp: runner.prepare_workdir(
        _workdir_with_results(tmp, "{x"), _config()), r"w/config.json is unreadable"),
    ("config.json not an object", lambda tmp, mp: runner.prepare_workdir(
        _workdir_with_results(tmp, "[1]"), _config()), r"config.json is unreadable \(a JSON list"),
    ("config.mesh wrong size", lambda tmp, mp: runner.check_mesh(_config(mesh=(2, 2, 1, 1)), 8),
     r"config.mesh=\(2, 2, 1, 1\) needs 4 devices, have 8"),
    ("config.mesh not ints", lambda tmp, mp: runner.check_mesh(_config(mesh=(8.0, 1, 1, 1)), 8),
     r"config.mesh=\(8.0, 1, 1, 1\); expected positive ints"),
    ("config.experiment unknown", lambda tmp, mp: runner.experiment_module("trian"),
     r"no module experiments/trian.py; did you mean train"),
    ("config without experiment", lambda tmp, mp: runner.run_experiment(
        ml_collections.ConfigDict({"x": 1}), f"{tmp}/w"), r"no field 'experiment'"),
    ("train log_every=0 through the runner", lambda tmp, mp: runner.run_experiment(
        _override(runner.load_config_file(TRAIN_TINY), "log_every", 0), f"{tmp}/w"),
     r"config.log_every=0; expected a positive int"),
    ("train learning_rate=nan through the runner", lambda tmp, mp: runner.run_experiment(
        _override(runner.load_config_file(TRAIN_TINY), "optimizer.learning_rate", float("nan")),
        f"{tmp}/w"), r"OptimizerConfig.learning_rate=nan"),
]

EXPERIMENT_ERRORS = [  # (module, get_config, field, value, message)
    (longctx_sweep, sweep_config, "num_samples", 0, r"config.num_samples=0; expected a positive"),
    (longctx_sweep, sweep_config, "tasks", (), r"config.tasks=\(\); expected at least one"),
    (longctx_sweep, sweep_config, "lengths", (), r"config.lengths=\(\)"),
    (longctx_sweep, sweep_config, "methods", (), r"config.methods=\(\)"),
    (longctx_sweep, sweep_config, "depths", (0.5, 1.5), r"config.depths\[1\]=1.5"),
    (longctx_sweep, sweep_config, "long_depths", (), r"config.long_depths=\(\)"),
    (longctx_sweep, sweep_config, "lengths", (1024, 0), r"config.lengths\[1\]=0"),
    (longctx_sweep, sweep_config, "batch_size", 0, r"config.batch_size=0"),
    (longctx_sweep, sweep_config, "batch_tokens", 0, r"config.batch_tokens=0"),
    (longctx_sweep, sweep_config, "compression_ratio", 1.0, r"config.compression_ratio=1.0"),
    (longctx_sweep, sweep_config, "niah_max_new_tokens", 0, r"config.niah_max_new_tokens=0"),
    (memory_recall, memory_config, "steps", 0, r"config.steps=0"),
    (memory_recall, memory_config, "eval_examples", 0, r"config.eval_examples=0"),
    (memory_recall, memory_config, "learning_rate", float("nan"), r"config.learning_rate=nan"),
    (memory_recall, memory_config, "memories", " , ", r"config.memories=' , '; expected at "),
    (memory_recall, memory_config, "memories", "none,lstm", r"config.memories has \['lstm'\]"),
    (finetune_longctx, finetune_config, "pretrain_steps", 0, r"config.pretrain_steps=0"),
    (finetune_longctx, finetune_config, "eval_samples", 0, r"config.eval_samples=0"),
    (finetune_longctx, finetune_config, "finetune_learning_rate", float("nan"),
     r"config.finetune_learning_rate=nan"),
    (finetune_longctx, finetune_config, "factor", 0.5, r"config.factor=0.5"),
    (finetune_longctx, finetune_config, "eval_lengths", (), r"config.eval_lengths=\(\)"),
]


@pytest.mark.parametrize("call,match", [
    pytest.param(call, match, id=f"error-{name}") for name, call, match in RUNNER_ERRORS])
def test_runner_errors_name_the_flag_field_or_file(tmp_path, monkeypatch, call, match):
    with pytest.raises((ValueError, app.UsageError), match=match):
        call(str(tmp_path), monkeypatch)


@pytest.mark.parametrize("module,get_config,field,value,match", [
    pytest.param(*case, id=f"error-{case[0].__name__.split('.')[-1]}.{case[2]}={case[3]!r}")
    for case in EXPERIMENT_ERRORS])
def test_experiment_config_errors_come_before_any_work(tmp_path, module, get_config, field,
                                                       value, match):
    with pytest.raises(ValueError, match=match):
        module.run(_override(get_config(), field, value), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_ok_corrected_rerun_is_accepted_when_no_result_was_written(tmp_path):
    """A first attempt that failed before any result (here: warmup_steps >= num_steps) leaves
    only config.json; the corrected config starts afresh instead of 'a different config'."""
    workdir = str(tmp_path / "w")
    bad = _override(runner.load_config_file(TRAIN_TINY), "num_steps", 5)
    with pytest.raises(ValueError, match=r"warmup_steps=10 >= total_steps=5"):
        runner.run_experiment(bad, workdir)
    os.makedirs(os.path.join(workdir, "checkpoints"))  # an empty directory is no result either
    good = _override(_override(runner.load_config_file(TRAIN_TINY), "num_steps", 5),
                     "optimizer.warmup_steps", 1)
    assert runner.prepare_workdir(workdir, good) is False
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optimizer"]["warmup_steps"] == 1


@pytest.mark.parametrize("call", [
    pytest.param(lambda tmp: runner.prepare_workdir(_workdir_with_results(tmp), _config()) is True,
                 id="ok-same-config-resumes"),
    pytest.param(lambda tmp: runner.prepare_workdir(
        _workdir_with_results(tmp, ""), _config(), allow_config_change=True) is True,
                 id="ok-empty-config.json-with-allow_config_change"),
    pytest.param(lambda tmp: runner.check_mesh(_config(mesh=(np.int64(2), 2, 2, 1)), 8) is None,
                 id="ok-numpy-int-mesh"),
    pytest.param(lambda tmp: longctx_sweep.check_config(sweep_config()) is None,
                 id="ok-longctx_sweep-default-config"),
])
def test_accepted_inputs(tmp_path, call):
    assert call(str(tmp_path))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_error_command_line_prints_one_line(tmp_path):
    """error: the command line turns these into one `error:` line, exit status 1."""
    out = _run(f"--config={tmp_path}/none.py", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --config='{tmp_path}/none.py' is not a file; expected configs/<name>.py")
    (tmp_path / "file").write_text("")
    out = _run("--config=configs/train_tiny.py", f"--workdir={tmp_path / 'file'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: --workdir='{tmp_path / 'file'}' is a file")
