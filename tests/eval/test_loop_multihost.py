"""Evaluation across two processes (jax.distributed, 2 CPU devices each, gloo): each process
reads its rows of every batch, process 0 alone reads and writes the workdir, and the results
equal the one-process run's, fresh and resumed (tests/multihost/eval_worker.py)."""

import filecmp
import shutil
from pathlib import Path

import pytest
from multihost_launch import run_processes
from test_loop import _records

from lcm.eval import EvalOptions

WORKER = Path(__file__).parents[1] / "multihost" / "eval_worker.py"
RECORDS = _records(lengths=(24, 56), depths=(0.0, 0.5, 1.0), tasks=("passkey",))
OPTIONS = EvalOptions(batch_size=4, pad_multiple=32, progress=False, heatmaps=False)


@pytest.mark.slow
def test_two_process_evaluation_writes_the_one_process_results(tmp_path):
    from test_loop import CFG, PARAMS, TOK

    from lcm.eval import evaluate

    one = tmp_path / "one"
    evaluate(PARAMS, CFG, RECORDS, TOK, str(one), options=OPTIONS)
    lines = (one / "results.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == len(RECORDS)
    # Process 0's disk holds an interrupted run: 4 finished rows and half of the fifth.
    resumed = tmp_path / "p0" / "resumed"
    resumed.mkdir(parents=True)
    shutil.copy(one / "runs.json", resumed / "runs.json")
    (resumed / "results.jsonl").write_text("".join(lines[:4]) + lines[4][:40])
    (tmp_path / "p0" / "blocked").write_text("a file where the workdir should go")

    outputs = run_processes(WORKER, f"--root={tmp_path}", timeout_s=300)
    for i, out in enumerate(outputs):
        # Both processes ran every batch and return process 0's summary.
        assert f"process {i}: fresh wrote 6 samples, summary of 6 samples" in out, out[-3000:]
        assert f"process {i}: resumed wrote 2 samples, summary of 6 samples" in out, out[-3000:]
        assert f"process {i}: refused: {tmp_path}/p0/fresh: run 'eval' was made with a " \
               f"different setup" in out, out[-3000:]
    # Process 0 cannot create its workdir: it raises the OSError, process 1 hears of it.
    assert "process 0: blocked: FileExistsError" in outputs[0], outputs[0][-3000:]
    assert "process 1: blocked: RuntimeError: process 0 failed: FileExistsError" in outputs[1], \
        outputs[1][-3000:]
    for name in ("fresh", "resumed"):
        assert filecmp.cmp(one / "results.jsonl", tmp_path / "p0" / name / "results.jsonl",
                           shallow=False)
        assert (tmp_path / "p0" / name / "summary.json").exists()
    assert not (tmp_path / "p1").exists(), sorted(map(str, (tmp_path / "p1").rglob("*")))
