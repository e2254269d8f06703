"""The long-context sweep (experiments/longctx_sweep.py) on a small random model: every run, the
reports from one call, resume after a kill, and config errors before any work."""

import filecmp

import pytest

from configs.longctx_sweep import get_config
from experiments import longctx_sweep


def _config(**changes):
    config = get_config()
    config.model = "tiny"
    config.lengths = (448, 512)
    config.depths = (0.0, 1.0)
    config.methods = ("full",)
    config.extended_lengths = (1024,)
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
    assert runs == {"native-full", "yarn-full", "self_extend-full"}
    assert {(c["task"], c["length"]) for c in summary["cells"] if c["run"] == "yarn-full"} == {
        ("passkey", 1024), ("niah", 1024)}
    assert summary["num_samples"] == 2 * 2 * 2 + 2 * 2 * 2
    for run in runs:
        for task in ("passkey", "niah"):
            assert (tmp_path / "full" / f"heatmap_{run}_{task}.png").stat().st_size > 0
    for task in ("passkey", "niah"):  # every run side by side
        assert (tmp_path / "full" / f"heatmaps_{task}.png").stat().st_size > 0
    assert (tmp_path / "full" / "results.md").read_text().count("**avg**") == 3

    real = longctx_sweep.default_generate_fn()
    calls = []

    def dies(*args, **kw):
        if len(calls) == 5:
            raise _Killed
        calls.append(1)
        return real(*args, **kw)

    dies.__module__, dies.__qualname__ = real.__module__, real.__qualname__
    monkeypatch.setattr(longctx_sweep, "default_generate_fn", lambda: dies)
    with pytest.raises(_Killed):
        longctx_sweep.run(_config(), str(tmp_path / "cut"))
    monkeypatch.undo()
    resumed = longctx_sweep.run(_config(), str(tmp_path / "cut"))
    assert resumed["sweep"]["runs"]["native-full"]["samples_this_session"] == 3
    assert filecmp.cmp(tmp_path / "full" / "results.jsonl", tmp_path / "cut" / "results.jsonl",
                       shallow=False)


@pytest.mark.parametrize("changes,match", [
    ({"lengths": (448, 1024)}, "extended_lengths"),
    ({"methods": ("full", "h2o")}, "expected some of"),
    ({"extension_methods": ("snapkv",)}, "only 'full'"),
    ({"self_extend_window": 4096}, "self_extend_window=4096"),
    ({"self_extend_group_size": 1}, "reaches 512 tokens"),
    ({"extensions": ("ntk",)}, "'ntk'"),
    ({"tasks": ("passkey", "vt")}, "'vt'"),
    ({"model": "llama"}, "config.model='llama'"),
])
def test_sweep_config_errors(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        longctx_sweep.run(_config(**changes), str(tmp_path))
