"""The one entry point for every experiment: a config file picks the experiment and its settings.

    python -m experiments.run --config=configs/<name>.py --config.<field>=<value> --workdir=DIR

`configs/<name>.py` defines `get_config() -> ml_collections.ConfigDict` whose `experiment` field
names a module `experiments/<experiment>.py` exposing `run(config, workdir) -> dict` (the summary,
which it also writes under the workdir). The runner:

- checks every `--config.<field>` override before anything runs; a field that does not exist
  names the closest valid ones;
- optionally calls `jax.distributed.initialize()` (`--jax_distributed`, or a config field
  `jax_distributed = True`) so the same command runs on every host of a TPU pod slice;
- checks a config field `mesh` (a tuple of mesh axis sizes over data, fsdp, tensor, context;
  empty: the experiment's default) against the devices before the experiment starts;
- writes the resolved config to `<workdir>/config.json` and refuses to resume into a workdir
  whose results came from a different config, unless `--overwrite` (delete them and start
  over) or `--allow_config_change` (keep them and resume with the new config);
- with `--dry_run`, does all of the above checks (and the experiment's own `check_config`, when
  it has one) without running or writing anything, prints the resolved config and exits 0.

TPU pod slice (every host runs the same command; the workdir should be shared, e.g. gs://...):

    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd lcm && \\
        python -m experiments.run --config=configs/train_tiny.py --jax_distributed \\
        --config.mesh='(1,8,1,1)' --workdir=/tmp/train_tiny"
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from lcm.checks import is_int

CONFIG_FILE_NAME = "config.json"
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's outputs.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the workdir's previous results "
                               "(of an lcm run) and start over.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume into a workdir whose "
                                  "results came from a different config (the old config is kept "
                                  "as config.<time>.json).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Resolve the config with its overrides, check it "
                              "as a run does before any work (experiment, its check_config, "
                              "mesh vs devices, workdir), print it and exit; runs and writes "
                              "nothing.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() "
                                 "first (multi-host: run the same command on every host).")


# ------------------------------------------------------------------------------- overrides


def load_config_file(path: str) -> config_dict.ConfigDict:
    """Imports a config file by path and returns its `get_config()`."""
    spec = importlib.util.spec_from_file_location("_lcm_config", path)
    if spec is None or not os.path.isfile(path):
        raise ValueError(f"--config={path!r} is not a file; expected configs/<name>.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"--config={path!r}: line {e.lineno}: {e.msg}") from None
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config={path!r} defines no get_config()")
    return module.get_config()


def unknown_override(config: config_dict.ConfigDict, field: str) -> str | None:
    """None if `field` (dotted, e.g. "model.num_layers") exists in `config`, else a message
    naming the closest valid fields at the level where the path breaks."""
    node, walked = config, []
    for part in field.split("."):
        if not isinstance(node, (config_dict.ConfigDict, dict)) or part not in node:
            valid = sorted(node.keys()) if isinstance(node, (config_dict.ConfigDict, dict)) else []
            prefix = "".join(f"{w}." for w in walked)
            close = difflib.get_close_matches(part, valid, n=3, cutoff=0.5)
            hint = (f"did you mean {', '.join('--config.' + prefix + c for c in close)}? "
                    if close else "")
            where = f"config.{'.'.join(walked)}" if walked else "the config"
            return (f"--config.{field}: {where} has no field {part!r}; {hint}valid fields: "
                    f"{', '.join(valid) or '(none: ' + where + ' is not a group)'}")
        node, walked = node[part], walked + [part]
    return None


def check_overrides(argv: list[str]) -> None:
    """Raises app.UsageError for a `--config.<field>` override naming no field of the config."""
    path, fields = None, []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config."):
            fields.append(arg[len("--config."):].split("=", 1)[0])
    if path is None:
        return
    config = load_config_file(path)  # a missing or broken file: one line, before absl's parse
    if not fields:
        return
    problems = [m for f in fields if (m := unknown_override(config, f))]
    if problems:
        raise app.UsageError("\n".join(problems))


# ------------------------------------------------------------------------------- workdir


def config_json(config: config_dict.ConfigDict) -> str:
    """The resolved config as sorted, indented JSON (tuples become lists)."""
    return json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True)


def prepare_workdir(workdir: str, config, *, overwrite: bool = False,
                    allow_config_change: bool = False, is_primary: bool = True) -> bool:
    """Creates `workdir` and records the config in it; returns True when resuming.

    A workdir that exists and is not empty must come from an lcm run (it holds config.json);
    with the same config, the experiment resumes from what is there. With a different config it
    raises, unless `overwrite` (delete its contents first) or `allow_config_change`. A workdir
    that holds no result yet (`has_results`: a first attempt failed early) starts afresh with
    any config. Only the primary process writes; the others only check.
    """
    text = config_json(config)
    path = os.path.join(workdir, CONFIG_FILE_NAME)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir!r} is a file; expected a directory (new or from "
                         f"an lcm run)")
    entries = os.listdir(workdir) if os.path.isdir(workdir) else []
    if entries and not os.path.isfile(path):
        raise ValueError(f"--workdir={workdir!r} is not empty and holds no {CONFIG_FILE_NAME}, "
                         f"so it is not an lcm run directory; pick a new or empty directory")
    resuming = bool(entries)
    # An attempt that failed before writing any result (a bad config, say) leaves nothing to
    # resume or protect: a corrected config starts afresh.
    if resuming and (overwrite or not has_results(workdir)):
        if is_primary:
            for name in entries:
                full = os.path.join(workdir, name)
                if os.path.isdir(full):
                    shutil.rmtree(full)
                else:
                    os.remove(full)
        resuming = False
    elif resuming:
        old = _read_config_json(path, allow_config_change)
        if old != json.loads(text):
            diff = (_diff_fields(old, json.loads(text)) if old is not None
                    else f"{path} is unreadable")
            if not allow_config_change:
                raise ValueError(
                    f"--workdir={workdir!r} holds results of a different config ({diff}); pass "
                    f"--overwrite to delete them and start over, --allow_config_change to resume "
                    f"with the new config, or choose another --workdir")
            if is_primary:
                os.replace(path, os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}"
                                                       f".json"))
    if is_primary:
        tmp = path + ".tmp"
        try:
            os.makedirs(workdir, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(text + ("" if text.endswith("\n") else "\n"))
            os.replace(tmp, path)
        except OSError as e:
            raise ValueError(f"--workdir={workdir!r} is not writable ({e.strerror}: "
                             f"{e.filename}); pick a directory you can write") from None
    return resuming


_NOT_RESULTS = (CONFIG_FILE_NAME, "runs.json")


def has_results(workdir: str) -> bool:
    """Whether `workdir` holds any file besides the configs (config.json, config.<time>.json,
    an evaluation's runs.json) and temporary files: an empty checkpoints/ directory is none."""
    for _, _, names in os.walk(workdir):
        for name in names:
            if not (name in _NOT_RESULTS or ".tmp" in name
                    or (name.startswith("config.") and name.endswith(".json"))):
                return True
    return False


def _read_config_json(path: str, allow_config_change: bool):
    """The recorded config, or None when unreadable and allow_config_change (else an error
    naming the file)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
        return config
    except (ValueError, UnicodeDecodeError) as e:
        if allow_config_change:
            return None
        raise ValueError(f"{path} is unreadable ({e}); pass --allow_config_change to resume "
                         f"with this config, or --overwrite to start over") from None


def _diff_fields(old: dict, new: dict, prefix: str = "") -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff_fields(a, b, f"{prefix}{key}.")
            changes += [inner] if inner else []
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(changes)


# ------------------------------------------------------------------------------- running


def check_mesh(config, device_count: int) -> None:
    """A config field `mesh` (axis sizes) must multiply to the device count."""
    mesh = config.get("mesh")
    if not mesh:  # None or (): the experiment picks (usually all devices on "data")
        return
    mesh = tuple(mesh)
    if any(not is_int(s) or s <= 0 for s in mesh):
        raise ValueError(f"config.mesh={mesh!r}; expected positive ints (data, fsdp, tensor, "
                         f"context)")
    if math.prod(mesh) != device_count:
        raise ValueError(f"config.mesh={mesh} needs {math.prod(mesh)} devices, have "
                         f"{device_count}; set --config.mesh to axis sizes whose product is "
                         f"{device_count}")


def experiment_module(name: str):
    """The module experiments.<name>, which must define run(config, workdir)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"config.experiment={name!r}; expected a module name under experiments/")
    try:
        module = importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"experiments.{name}":
            raise
        here = os.path.dirname(os.path.abspath(__file__))
        known = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and f[0] != "_")
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"config.experiment={name!r}: no module experiments/{name}.py"
                         f"{'; did you mean ' + ', '.join(close) + '?' if close else ''}") from e
    if not callable(getattr(module, "run", None)):
        raise ValueError(f"experiments/{name}.py has no run(config, workdir) function")
    return module


def run_experiment(config, workdir: str, *, overwrite: bool = False,
                   allow_config_change: bool = False, distributed: bool = False) -> dict:
    """Everything `main` does after flag parsing; usable from Python and tests."""
    if "experiment" not in config:
        raise ValueError("the config has no field 'experiment' naming experiments/<name>.py")
    module = experiment_module(config.experiment)
    import jax  # after flag parsing: JAX reads its own flags and XLA_FLAGS at import

    if distributed or config.get("jax_distributed", False):
        jax.distributed.initialize()
    check_mesh(config, jax.device_count())
    resuming = prepare_workdir(workdir, config, overwrite=overwrite,
                               allow_config_change=allow_config_change,
                               is_primary=jax.process_index() == 0)
    logging.info("experiment %s in %s (%s)", config.experiment, workdir,
                 "resuming" if resuming else "fresh")
    summary = module.run(config, workdir)
    if not isinstance(summary, dict):
        raise TypeError(f"experiments/{config.experiment}.py run() returned "
                        f"{type(summary).__name__}; expected a dict summary")
    return summary


def dry_run(config, workdir: str, *, overwrite: bool = False,
            allow_config_change: bool = False, distributed: bool = False) -> str:
    """The checks `run_experiment` makes before any work, without running or writing anything:
    the experiment module exists, its `check_config(config)` passes (when it defines one), the
    mesh fits the devices, and the workdir can take this config. Returns the report to print:
    the resolved config as JSON and one line saying what a run would do. `distributed` is only
    reported: a dry run never calls `jax.distributed.initialize()`."""
    if "experiment" not in config:
        raise ValueError("the config has no field 'experiment' naming experiments/<name>.py")
    module = experiment_module(config.experiment)
    check = getattr(module, "check_config", None)
    if callable(check):
        check(config)
    import jax  # after flag parsing, as in run_experiment

    distributed = distributed or bool(config.get("jax_distributed", False))
    if not distributed:  # a multi-host mesh spans every host's devices, unknown here
        check_mesh(config, jax.device_count())
    resuming = prepare_workdir(workdir, config, overwrite=overwrite,
                               allow_config_change=allow_config_change, is_primary=False)
    how = "resume" if resuming else "start afresh"
    return (f"{config_json(config)}\ndry run: experiments/{config.experiment}.py would {how} in "
            f"{workdir} on {jax.device_count()} {jax.default_backend()} device(s)"
            f"{' per host after jax.distributed.initialize()' if distributed else ''}; "
            f"nothing was run or written")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config=configs/<name>.py and --workdir=DIR are required")
    try:
        if _DRY_RUN.value:
            print(dry_run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                          allow_config_change=_ALLOW_CHANGE.value,
                          distributed=_DISTRIBUTED.value))
            return
        run_experiment(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                       allow_config_change=_ALLOW_CHANGE.value, distributed=_DISTRIBUTED.value)
    except (ValueError, OSError, FloatingPointError) as e:  # each names its argument, file
        # or step: one line, no traceback
        sys.exit(f"error: {e}")


def entry_point(argv=None, *, default_experiment: str | None = None):
    """Runs main with the override check first (a clean message instead of a traceback).

    `default_experiment` lets `python -m experiments.<name> [--config.<field>=...]` run with
    configs/<name>.py and a workdir under /tmp/lcm/ unless --config / --workdir are given.
    """
    argv = list(sys.argv if argv is None else argv)
    if default_experiment is not None:
        if not any(a == "--config" or a.startswith("--config=") for a in argv):
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            # Before any --config.<field>: config_flags applies overrides to a loaded file.
            argv.insert(1, f"--config={os.path.join(root, 'configs', default_experiment + '.py')}")
        if not any(a == "--workdir" or a.startswith("--workdir=") for a in argv):
            argv += [f"--workdir=/tmp/lcm/{default_experiment}", "--allow_config_change"]
    try:
        check_overrides(argv[1:])
    except (app.UsageError, ValueError) as e:
        sys.exit(f"error: {e}")
    app.run(main, argv=argv)


if __name__ == "__main__":
    entry_point()
