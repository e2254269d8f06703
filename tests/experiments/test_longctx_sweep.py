"""The long-context sweep (experiments/longctx_sweep.py) on a small random model: every run, the
reports from one call, resume after a kill, the persistent compilation cache, the presets, and
config errors before any work."""

import filecmp
import json
import os

import jax
import pytest

import lcm.eval.loop
from lcm.eval import metrics
from configs.longctx_sweep import get_config
from experiments import longctx_sweep


def _config(**changes):
    config = get_config()
    config.model = "tiny"
    config.preset = "cpu"
    config.compilation_cache = "off"
    config.num_samples = 1
    config.long_samples = 1
    config.batch_tokens = None
    config.lengths = (448, 512)
    config.depths = (0.0, 1.0)
    config.long_depths = (0.5,)
    config.long_from = 1024
    config.methods = ("full", "snapkv")
    config.extension_methods = ("full",)
    config.extended_lengths = (1024,)
    config.extended_tasks = ("passkey", "niah")
    config.batch_size = 1
    config.self_extend_window = 128
    config.progress = False
    for k, v in changes.items():
        setattr(config, k, v)
    return config


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_sweep_writes_every_run_and_resumes_after_a_kill(tmp_path, monkeypatch):
    summary = longctx_sweep.run(_config(), str(tmp_path / "full"))
    runs = {c["run"] for c in summary["cells"]}
    assert runs == {"native-full", "native-snapkv", "yarn-full", "self_extend-full"}
    assert {(c["task"], c["length"]) for c in summary["cells"] if c["run"] == "yarn-full"} == {
        ("passkey", 1024), ("niah", 1024)}
    # Depths (0, 1) at the native lengths, long_depths (0.5,) from long_from = 1024 on.
    assert summary["num_samples"] == 2 * (2 * 2 * 2) + 2 * 1 * 2
    assert set(summary["sweep"]["settings"]) == {"native", "yarn", "self_extend"}
    assert summary["sweep"]["settings"]["native"]["prefill_s"] > 0  # one prefill, two methods
    for run in runs:
        for task in ("passkey", "niah"):
            assert (tmp_path / "full" / f"heatmap_{run}_{task}.png").stat().st_size > 0
    for task in ("passkey", "niah"):  # every run side by side, and one panel per method
        assert (tmp_path / "full" / f"heatmaps_{task}.png").stat().st_size > 0
        assert summary["files"][f"sweep/{task}"] == f"sweep_{task}.png"
        assert (tmp_path / "full" / f"sweep_{task}.png").stat().st_size > 0
    assert (tmp_path / "full" / "results.md").read_text().count("**avg**") == 4

    real, calls = lcm.eval.loop.append_lines, []

    def dies(*args, **kw):  # killed after five batches of the native setting were written
        if len(calls) == 5:
            raise _Killed
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(lcm.eval.loop, "append_lines", dies)
    with pytest.raises(_Killed):
        longctx_sweep.run(_config(), str(tmp_path / "cut"))
    monkeypatch.undo()
    resumed = longctx_sweep.run(_config(), str(tmp_path / "cut"))
    assert resumed["sweep"]["settings"]["native"]["samples_this_session"] == 2 * 3
    assert filecmp.cmp(tmp_path / "full" / "results.jsonl",
                                tmp_path / "cut" / "results.jsonl", shallow=False)


@pytest.mark.parametrize("changes,match", [
    ({"lengths": (448, 1024)}, "extended_lengths"),
    ({"methods": ("full", "h2o")}, "expected some of"),
    ({"self_extend_window": 4096}, "self_extend_window=4096"),
    ({"self_extend_group_size": 1}, "reaches 512 tokens"),
    ({"extensions": ("ntk",)}, "'ntk'"),
    ({"tasks": ("passkey", "vt")}, "'vt'"),
    ({"extended_tasks": ("cwe",)}, r"config.extended_tasks holds 'cwe'"),
    ({"model": "llama"}, "config.model='llama'"),
    ({"preset": "gpu"}, r"config.preset='gpu'; expected one of \['auto', 'cpu', 'accelerator'\]"),
    ({"long_samples": 0}, "long_samples"),
    ({"compilation_cache": ""}, "config.compilation_cache=''"),
])
def test_sweep_config_errors(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        longctx_sweep.run(_config(**changes), str(tmp_path))


def _cache_files(path):
    return sum(len(files) for _, _, files in os.walk(path))


@pytest.mark.slow
def test_rerun_compiles_nothing_with_the_persistent_cache(tmp_path):
    # One length, one method: a second run into a new workdir, its in-memory caches cleared,
    # reads every program from the cache directory and writes the same results.
    config = _config(lengths=(448,), methods=("full",), extended_lengths=(), num_samples=2,
                     batch_size=4, compilation_cache=str(tmp_path / "cache"))
    jax.clear_caches()  # programs compiled by earlier tests in this process compile again
    first = longctx_sweep.run(config, str(tmp_path / "a"))["sweep"]["compilation"]
    assert first["cache_dir"] == str(tmp_path / "cache")
    assert first["compiled"] > 0 and first["cache_hits"] == 0 and first["compile_s"] > 0
    written = _cache_files(tmp_path / "cache")
    assert written >= first["compiled"]
    jax.clear_caches()
    second = longctx_sweep.run(config, str(tmp_path / "b"))
    assert second["sweep"]["compilation"]["compiled"] == 0
    assert second["sweep"]["compilation"]["cache_hits"] == first["compiled"]
    assert _cache_files(tmp_path / "cache") == written
    assert filecmp.cmp(tmp_path / "a" / "results.jsonl", tmp_path / "b" / "results.jsonl",
                       shallow=False)
    # JAX's own settings are back after the run.
    assert jax.config.jax_compilation_cache_dir != str(tmp_path / "cache")
    on_disk = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert on_disk["sweep"]["compilation"] == second["sweep"]["compilation"]

    # The per-cell table: every (task, length) row with its n and the interval of its cells.
    table = (tmp_path / "b" / "sweep.md").read_text()
    cells = {(c["task"], c["length"]): c for c in second["cells"]}
    for task in ("passkey", "niah"):
        c = cells[(task, 448)]
        assert c["num_samples"] == 2 * 2  # two depths x two samples, pooled
        low, high = metrics.wilson_interval(c["successes"], 4)
        assert (c["ci_low"], c["ci_high"]) == (round(100 * low, 2), round(100 * high, 2))
        assert (f"| {task} | 448 | 4 | {c['score']:.0f} [{c['ci_low']:.0f}-{c['ci_high']:.0f}] |"
                in table)


def test_presets_and_the_default_grid(monkeypatch):
    config = get_config()
    assert longctx_sweep.resolve_preset(config)[0] == "cpu"  # tests run on the CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    preset, resolved = longctx_sweep.resolve_preset(config)
    assert preset == "accelerator" and resolved.extended_lengths == (16384,)
    assert resolved.long_samples == config.accelerator.long_samples
    assert config.extended_lengths == ()  # the config itself is not changed
    config.preset = "cpu"
    assert longctx_sweep.resolve_preset(config)[1].extended_lengths == ()
    config.accelerator.lenghts = (1024,)
    config.preset = "accelerator"
    with pytest.raises(ValueError, match="config.accelerator.lenghts is not a field"):
        longctx_sweep.resolve_preset(config)

    # The CPU default: >= 15 samples per (length, method) up to 4k with tasks and depths
    # pooled, and batches that divide each length's prompts (no padding row is prefilled).
    config = get_config()
    for length in config.lengths:
        n = len(longctx_sweep.depths_at(config, length)) * longctx_sweep.samples_at(
            config, length)
        assert len(config.tasks) * n >= (15 if length <= 4096 else 2), length
        rows = min(config.batch_size, config.batch_tokens // length)
        assert (len(config.tasks) * n) % rows == 0, length
    assert config.passkey_max_new_tokens == config.niah_max_new_tokens  # one group per length


def test_compilation_cache_dir_choices(tmp_path, monkeypatch):
    config = get_config()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert longctx_sweep.compilation_cache_dir(config, "w") == str(
        tmp_path / "xdg" / "lcm" / "jax_compilation_cache")
    config.compilation_cache = "workdir"
    assert longctx_sweep.compilation_cache_dir(config, "w") == os.path.join(
        "w", "jax_compilation_cache")
    config.compilation_cache = "off"
    assert longctx_sweep.compilation_cache_dir(config, "w") is None


def test_sweep_table_rows_columns_and_intervals():
    from lcm.eval.results import summarize

    rows = []
    for run, hits in (("native-full", 15), ("native-snapkv", 6), ("yarn-full", 0)):
        length = 16384 if run.startswith("yarn") else 2048
        n = 2 if run.startswith("yarn") else 15
        for i in range(n):
            rows.append({"run": run, "id": f"p{i}", "task": "passkey", "length": length,
                         "metric": "exact_match", "prediction": "x", "answers": ["1"],
                         "depth": 0.5, "score": 1.0 if i < hits else 0.0})
    rows.append(dict(rows[0], run="native-snapkv", id="extra"))  # snapkv's n is 16 there
    table = longctx_sweep.sweep_table(summarize(rows))
    lines = table.splitlines()
    assert lines[0] == "| task | length | n | full cache | SnapKV |"
    low, high = metrics.wilson_interval(7, 16)
    assert lines[2] == (f"| passkey | 2k | - | 100 [80-100] (n=15) | 44 "
                        f"[{100 * low:.0f}-{100 * high:.0f}] (n=16) |")
    assert lines[3] == "| passkey | 16k YaRN | 2 | 0 [0-66] |  |"
    # With two tasks, a row per (setting, length) pools them: successes and n summed.
    niah = [dict(r, task="niah", id="n" + r["id"], score=1.0 - r["score"]) for r in rows]
    lines = longctx_sweep.sweep_table(summarize(rows + niah)).splitlines()
    low, high = metrics.wilson_interval(15, 30)
    low2, high2 = metrics.wilson_interval(16, 32)
    assert lines[-4] == (f"| all tasks | 2k | - | 50 [{100 * low:.0f}-{100 * high:.0f}] (n=30) | "
                         f"50 [{100 * low2:.0f}-{100 * high2:.0f}] (n=32) |"), lines
    low, high = metrics.wilson_interval(2, 4)
    assert lines[-3] == f"| all tasks | 16k YaRN | 4 | 50 [{100 * low:.0f}-{100 * high:.0f}] |  |"
