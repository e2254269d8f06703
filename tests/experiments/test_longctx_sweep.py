"""The long-context sweep (experiments/longctx_sweep.py) on a small random model: every run, the
reports from one call, resume after a kill, and config errors before any work."""

import filecmp

import pytest

import lcm.eval.loop
from configs.longctx_sweep import get_config
from experiments import longctx_sweep


def _config(**changes):
    config = get_config()
    config.model = "tiny"
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
])
def test_sweep_config_errors(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        longctx_sweep.run(_config(**changes), str(tmp_path))
