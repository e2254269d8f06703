"""Training runs resume exactly: packed data, checkpoints and metrics continue bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from experiments import train as train_experiment
from experiments.run import load_config_file
from lcm.data.packing import packed_batches, synthetic_documents, text_documents
from lcm.data.tokenizers import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPARED = ("loss", "grad_norm", "param_norm", "tokens", "learning_rate")


def _tiny_config():
    config = load_config_file(os.path.join(ROOT, "configs", "train_tiny.py"))
    config.model.update(hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                        intermediate_size=32, attention_impl="reference")
    config.data.update(seq_len=32, batch_size=8, max_length=24)
    config.update(num_steps=8, checkpoint_every=3)
    config.optimizer.warmup_steps = 2
    return config


class _Killed(Exception):
    pass


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.csv")) as f:
        header, *lines = [line.strip().split(",") for line in f]
    return [{k: v for k, v in zip(header, line) if k in COMPARED + ("step",)} for line in lines]


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_loss_curve(tmp_path):
    config = _tiny_config()
    straight = str(tmp_path / "straight")
    summary = train_experiment.run(config, straight)
    assert summary["resumed_from_step"] == 0 and summary["final_loss"] < summary["first_loss"]

    interrupted = str(tmp_path / "interrupted")

    def kill_at_5(step, metrics):
        if step == 5:
            raise _Killed

    with pytest.raises(_Killed):
        train_experiment.run(config, interrupted, on_step=kill_at_5)
    assert [r["step"] for r in _rows(interrupted)] == ["1", "2", "3", "4", "5"]
    summary = train_experiment.run(config, interrupted)
    assert summary["resumed_from_step"] == 3
    # The CSV holds each step once, with exactly the values of the uninterrupted run (the
    # text is repr of the float32 value: equal strings mean equal bits).
    assert _rows(interrupted) == _rows(straight)
    with open(os.path.join(interrupted, "summary.json")) as f:
        assert json.load(f)["final_loss"] == summary["final_loss"]


def test_packing_rows_hold_whole_documents_in_order():
    docs = synthetic_documents(3, vocab_size=50, min_length=4, max_length=20)
    batch = next(iter(packed_batches(docs, seq_len=48, batch_size=4, seed=0, shuffle=False)))
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    assert tokens.shape == seg.shape == pos.shape == (4, 48)
    seen = []
    for row in range(4):
        for s in range(1, seg[row].max() + 1):
            where = np.flatnonzero(seg[row] == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            np.testing.assert_array_equal(pos[row, where], np.arange(where.size))
            seen.append(tokens[row, where])
        assert np.all(tokens[row, seg[row] == 0] == 0)
    # Every packed document is one of the source documents, whole (they are <= seq_len).
    source = [docs[i] for i in range(40)]
    assert all(any(np.array_equal(d, s) for s in source) for d in seen)


def test_packing_resumes_from_iterator_state():
    ds = packed_batches(synthetic_documents(0, vocab_size=50), seq_len=64, batch_size=2, seed=1)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = iter(ds)
    again.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    for w in want:
        got = next(again)
        assert all(np.array_equal(got[k], w[k]) for k in w)


def test_text_documents_read_jsonl_and_txt(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "ab"}\n\n{"text": "héllo"}\n')
    (tmp_path / "d.txt").write_text("first doc\nline two\n\n\nsecond\n")
    tok = ByteTokenizer()
    jsonl = text_documents(tmp_path / "d.jsonl", tok)
    assert len(jsonl) == 2 and list(jsonl[0]) == [97, 98, tok.eos_id]
    assert tok.decode(jsonl[1]) == "héllo"
    txt = text_documents(tmp_path / "d.txt", tok, add_eos=False, shard_index=1, shard_count=2)
    assert [tok.decode(d) for d in txt] == ["second"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with a string field "
                                         r"'text'"):
        text_documents(tmp_path / "bad.jsonl", tok)
    with pytest.raises(ValueError, match=r"expected a .jsonl or .txt file"):
        text_documents(_touch(tmp_path / "d.csv"), tok)
    with pytest.raises(ValueError, match=r"expected a grain.MapDataset"):
        packed_batches([np.arange(3)], seq_len=8, batch_size=1)
    assert isinstance(jsonl, grain.MapDataset)


def _touch(path):
    path.write_text("x")
    return path


def _train_command(workdir, *overrides):
    return [sys.executable, "-m", "experiments.run", "--config=configs/train_tiny.py",
            f"--workdir={workdir}", "--config.model.hidden_size=16", "--config.model.num_heads=2",
            "--config.model.num_kv_heads=1", "--config.model.head_dim=8",
            "--config.model.intermediate_size=32", "--config.model.attention_impl=reference",
            "--config.data.seq_len=32", "--config.data.max_length=24",
            "--config.num_steps=40", "--config.checkpoint_every=4", *overrides]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_loss_curve(tmp_path):
    """A run killed with SIGKILL (no cleanup, a save possibly in flight) and rerun by the same
    command ends with the metrics of a run that was never interrupted."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_command(straight), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    proc = subprocess.Popen(_train_command(killed), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        rows = _rows(str(killed)) if (killed / "metrics.csv").exists() else []
        if len(rows) >= 14:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 14 <= len(_rows(str(killed))) < 40, "the run was not killed halfway"
    subprocess.run(_train_command(killed), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    with open(killed / "summary.json") as f:
        assert json.load(f)["resumed_from_step"] >= 8
    assert _rows(str(killed)) == _rows(str(straight))
