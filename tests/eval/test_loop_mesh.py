"""Evaluation batches split over a mesh's data axis (8 simulated CPU devices) write the results
file of the unsharded run."""

import dataclasses
import filecmp

import pytest
from test_loop import CFG, PARAMS, TOK, _records

from lcm.eval import EvalOptions, evaluate
from lcm.sharding import make_mesh

OPTIONS = EvalOptions(batch_size=4, pad_multiple=32, progress=False, heatmaps=False)


@pytest.mark.slow
def test_sharded_evaluation_writes_the_unsharded_results(tmp_path):
    records = _records(lengths=(24, 56), depths=(0.0, 0.5, 1.0), tasks=("passkey",))
    evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "one"), options=OPTIONS)
    # data=4: four rows per batch, one per data shard (each shard's row on 2 fsdp devices).
    mesh = make_mesh((4, 2, 1, 1))
    summary = evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "mesh"), options=OPTIONS,
                       mesh=mesh)
    assert summary["timing"]["samples_this_session"] == len(records)
    assert filecmp.cmp(tmp_path / "one" / "results.jsonl", tmp_path / "mesh" / "results.jsonl",
                       shallow=False)
    # Rows per batch round to the data axis: batch_size 2 on data=4 gives the same batches.
    evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "rounded"),
             options=dataclasses.replace(OPTIONS, batch_size=2), mesh=mesh)
    assert filecmp.cmp(tmp_path / "one" / "results.jsonl",
                       tmp_path / "rounded" / "results.jsonl", shallow=False)


def test_mesh_without_the_data_axis_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"data_axis='batch'; expected one of the mesh axes"):
        evaluate(PARAMS, CFG, _records(lengths=(24,), tasks=("passkey",)), TOK, str(tmp_path),
                 options=OPTIONS, mesh=make_mesh((8, 1, 1, 1)), data_axis="batch")
