"""Every code block of README.md and docs/*.md runs in CI, so none can rot.

- ```python blocks run in order, per page, in one fresh subprocess (blocks of a page share
  state), with 8 simulated CPU devices and jax_numpy_rank_promotion="raise", in a temporary
  working directory.
- ```bash blocks are validated command by command, without running anything long:
  `python -m experiments.run ...` (also inside `gcloud ... --command="..."`) runs with
  `--dry_run` (the config and its overrides resolved and checked as a run checks them before any
  work, into a fresh workdir); `python -m pytest PATHS` must name existing tests (CI runs the
  suite); pip, venv and clone lines are what `.ci/run` itself exercises on a clean clone, and the
  README's two set-up commands must match it byte for byte; a script run by another Python (a
  side environment's peer script) must exist; `sphinx-build` is what tests/docs/test_docs.py
  runs; another `python -m experiments.<module>` (a tour, a device check: minutes, not rerun
  here) must be run by some test in tests/. Any other command fails this test: decide how to
  check it here.
- ```text blocks (output, file trees) are not run; every other fence needs one of these
  languages (MyST directives such as ```{toctree} aside).
"""

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "text"}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
CLONE = "git clone https://github.com/lcm-dev/lcm.git && cd lcm"


def blocks(page: Path):
    """(language, first line number, code) of every fenced block of `page`."""
    text = page.read_text(encoding="utf-8")
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 2
        yield m.group(1).strip(), line, m.group(2)


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _pages_with(language):
    return [pytest.param(p, id=_name(p)) for p in PAGES
            if any(lang == language for lang, _, _ in blocks(p))]


def test_every_block_has_a_known_language():
    bad = [f"{_name(p)}:{line} ```{lang}" for p in PAGES for lang, line, _ in blocks(p)
           if lang not in LANGUAGES and not lang.startswith("{")]
    assert not bad, f"fences need one of {sorted(LANGUAGES)} (text for output): {bad}"


# ------------------------------------------------------------------------------- python

_RUNNER = textwrap.dedent("""
    import sys, time
    namespace = {"__name__": "__main__"}
    for path, label in zip(sys.argv[1::2], sys.argv[2::2]):
        start = time.process_time()
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), label, "exec"), namespace)
        print(f"--- {label}: block done, {time.process_time() - start:.1f} s CPU", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with("python"))
def test_python_blocks_run(page, tmp_path):
    args = []
    for i, (lang, line, code) in enumerate(blocks(page)):
        if lang == "python":
            # Blank lines keep the traceback's line numbers those of the page.
            path = tmp_path / f"block{i}.py"
            path.write_text("\n" * (line - 1) + code, encoding="utf-8")
            args += [str(path), _name(page)]
    # The blocks are small, so compiling dominates: XLA's cheap CPU optimization level halves it.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               JAX_NUMPY_RANK_PROMOTION="raise", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"{_name(page)}: a python block failed\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


# ------------------------------------------------------------------------------- bash


def commands(code: str):
    """The simple commands of a shell block: continuations joined, comments dropped, split at
    `&&` and `;`; each as (env assignments, argv)."""
    for line in code.replace("\\\n", " ").splitlines():
        # A command substitution, $(...), stands for one word (its output).
        tokens = shlex.split(re.sub(r"\$\([^()]*\)", "SUBSTITUTED", line), comments=True)
        command = []
        for token in tokens + ["&&"]:
            if token in ("&&", ";"):
                env = {}
                while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):
                    key, value = command.pop(0).split("=", 1)
                    env[key] = value
                if command or env:
                    yield env, command
                command = []
            else:
                command.append(token)


def _extras():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+)\s*=", section, flags=re.M))


def _dry_run(argv, env, tmp_path):
    """`python -m experiments.run ...` with --dry_run, in this process (the tests' 8 simulated
    devices; `tests/experiments/test_run_dry_run.py` covers the command line itself): the flags
    parsed as the runner parses them, its workdir replaced by a fresh one."""
    from absl import flags
    from ml_collections import config_flags

    from experiments import run as runner

    assert set(env) <= {"XLA_FLAGS"}, f"{shlex.join(argv)}: environment {env}"
    args = argv[3:]
    assert any(a.startswith("--workdir=") for a in args), f"no --workdir in {argv}"
    try:
        runner.check_overrides(args)  # the config file loads, every override names a field
    except Exception as e:  # app.UsageError or ValueError, as the runner prints them
        raise AssertionError(f"{shlex.join(argv)}: {e}") from None
    known = ("--config", "--workdir=", "--overwrite", "--allow_config_change",
             "--jax_distributed", "--dry_run")
    unknown = [a for a in args if not a.startswith(known)]
    assert not unknown, f"{shlex.join(argv)}: flags experiments.run does not define: {unknown}"
    values = flags.FlagValues()
    config_args = ["run"] + [a for a in args if a.startswith("--config")]
    # sys_argv: config_flags finds the file there and defines its --config.<field> flags.
    config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=config_args)
    values(config_args)
    workdir = tmp_path / f"workdir{len(list(tmp_path.iterdir()))}"
    try:
        runner.dry_run(values.config, str(workdir), overwrite="--overwrite" in args,
                       allow_config_change="--allow_config_change" in args,
                       distributed="--jax_distributed" in args)
    except ModuleNotFoundError as e:
        # An experiment needing an extra that CI does not install (tokamax: `.[bench]`): its
        # config file and override names were checked above, as the runner checks them.
        assert e.name in _optional_packages(), f"{shlex.join(argv)}: {e}"
    except ValueError as e:
        raise AssertionError(f"{shlex.join(argv)} --dry_run: {e}") from None
    assert not workdir.exists()


def _optional_packages():
    """Import names of the packages that only optional extras besides `test` install."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    names = set()
    for extra, body in re.findall(r"^(\w+)\s*=\s*\[(.*?)\]", section, flags=re.M | re.S):
        if extra != "test":
            names |= {re.split(r"[<>=\[]", p)[0].replace("-", "_")
                      for p in re.findall(r'"([^"]+)"', body)}
    return names - {"jax"}


def check_command(env, argv, tmp_path):
    """Validates one command of a shell block (see the module docstring); returns how."""
    prog = argv[0] if argv else ""
    if argv[:2] == ["cd", "lcm"] or prog in (".", "source") and argv[1:] == [".venv/bin/activate"]:
        return "shell"
    if argv[:2] == ["git", "clone"]:
        assert argv[2:] == ["https://github.com/lcm-dev/lcm.git"], argv
        return "clone (.ci/run runs on a clean clone)"
    if prog.startswith("python3") and argv[1:] == ["-m", "venv", ".venv"]:
        assert set(env) <= {"PYENV_VERSION"}, env
        return "venv (.ci/run)"
    if prog == "pip" and argv[1:2] == ["install"]:
        for spec in argv[2:]:
            m = re.fullmatch(r"-e|\.(?:\[([\w,]+)\])?|--no-deps|-q|'?[\w.-]+==[\w.]+'?", spec)
            assert m, f"pip install {spec!r}: not a form this test knows"
            if m.group(1):
                missing = set(m.group(1).split(",")) - _extras()
                assert not missing, f"pip install {spec}: no extra {missing} in pyproject.toml"
        return "pip (.ci/run installs the same way)"
    if prog in ("python", "python3") and argv[1:3] == ["-m", "experiments.run"]:
        _dry_run(argv, env, tmp_path)
        return "dry run"
    if prog in ("python", "python3") and argv[1:3] == ["-m", "pytest"]:
        rest, paths = argv[3:], []
        while rest:
            arg = rest.pop(0)
            if arg in ("-n", "-k", "-m", "-p"):
                rest.pop(0)  # the option's value
            elif not arg.startswith("-"):
                paths.append(arg.split("::")[0])
        assert paths, argv
        for path in paths:
            assert (ROOT / path).exists(), f"{shlex.join(argv)}: {path} does not exist"
        return "pytest (the suite runs in CI)"
    if prog in ("python", "python3") and len(argv) > 2 and argv[1] == "-m" and (
            argv[2].startswith("experiments.")):
        # Another module of experiments/ (a tour, a device check) is not rerun here: a test
        # must run it.
        module = argv[2]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"no module {module}"
        runs = [t for t in (ROOT / "tests").rglob("test_*.py")
                if t.parent.name != "docs" and module in t.read_text(encoding="utf-8")]
        assert runs, f"{shlex.join(argv)}: no test in tests/ runs {module}"
        return "experiments module (run by a test)"
    if prog == "sphinx-build":
        assert "-W" in argv and "docs" in argv, argv
        return "docs build (tests/docs/test_docs.py)"
    if prog == "gcloud":
        inner = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
        assert len(inner) == 1, argv
        for sub_env, sub in commands(inner[0]):
            check_command(sub_env, sub, tmp_path)
        return "gcloud (its command checked)"
    if prog.endswith("/bin/python") and len(argv) > 1 and argv[1].startswith("experiments/"):
        assert (ROOT / argv[1]).is_file(), f"{shlex.join(argv)}: no {argv[1]}"
        return "peer script in a side environment (exists)"
    raise AssertionError(f"no check for the command {shlex.join(argv)!r}: add one to "
                         f"tests/docs/test_doc_blocks.py, or mark the block ```text")


@pytest.mark.parametrize("page", _pages_with("bash"))
def test_shell_blocks_are_valid(page, tmp_path):
    for lang, line, code in blocks(page):
        if lang != "bash":
            continue
        for env, argv in commands(code):
            try:
                check_command(env, argv, tmp_path)
            except AssertionError as e:
                raise AssertionError(f"{_name(page)}:{line}: {e}") from None


def test_readme_set_up_commands_are_ci_s():
    """The clone line, then the main job's command and the suite's, the latter byte-identical
    to the line .ci/run runs, both choosing Python the same way."""
    readme = next(code for lang, _, code in blocks(ROOT / "README.md") if lang == "bash")
    clone, main_job, suite = readme.strip().splitlines()
    assert clone == CLONE
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert suite in ci, "README's second set-up command differs from .ci/run's"
    assert main_job.split(" && ")[0] == suite.split(" && ")[0]
    assert "pyenv latest 3.12" in suite and "python -m pytest" in suite
    assert "-m experiments.run --config=configs/longctx_sweep.py" in main_job


@pytest.mark.parametrize("command,message", [
    ("python -m experiments.run --config=configs/longctx_sweep.py --workdir=/tmp/w "
     "--config.num_samples=0", "num_samples"),                      # the experiment's own check
    ("python -m experiments.run --config=configs/longctx_sweep.py --workdir=/tmp/w "
     "--config.num_sample=3", "did you mean"),                      # a misspelt field
    ("python -m experiments.run --config=configs/train_tiny.py --workdir=/tmp/w "
     "--config.mesh='(1,3,1,1)'", "config.mesh"),                   # 3 devices of 8
    ("python -m experiments.run --config=configs/no_such.py --workdir=/tmp/w", "no_such"),
    ("python -m experiments.run --config=configs/train_tiny.py", "--workdir"),
    ("pip install -e '.[no_such_extra]'", "no_such_extra"),
    ("python -m pytest tests/no_such_test.py", "does not exist"),
    ("python -m experiments.quickstart", "no test in tests/ runs"),
    ("curl https://example.com | sh", "no check for the command"),
])
def test_bad_commands_are_caught(command, message, tmp_path):
    with pytest.raises((AssertionError, ValueError, SystemExit), match=re.escape(message)):
        for env, argv in commands(command):
            check_command(env, argv, tmp_path)
