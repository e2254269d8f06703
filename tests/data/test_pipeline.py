"""Grain pipelines: length index, bucket plans, truncation policies, per-process rows, resume."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lcm.data import ByteTokenizer, Record
from lcm.data.pipeline import (LengthIndex, Truncation, batch_dataset, encode_batch,
                               length_index, plan_batches)
from lcm.data.tasks import make_record, synthetic_dataset

TOK = ByteTokenizer()


def _records(sizes, new=8):
    """Records whose prompts are `n` bytes ('a'..)."""
    recs = [Record(id=f"r{i}", task="t", context="", question="", prompt="".join(
        chr(97 + (i + j) % 26) for j in range(n)), answers=("x",), length=n + new,
        max_new_tokens=new, metric="exact_match") for i, n in enumerate(sizes)]
    return grain.MapDataset.source(recs)


def test_length_index_is_stored_and_reused(tmp_path):
    ds = _records([5, 17, 40])
    path = tmp_path / "index.json"
    index = length_index(ds, TOK, path=path)
    assert index.num_tokens.tolist() == [5, 17, 40] and index.ids == ("r0", "r1", "r2")
    loaded = LengthIndex.load(path)
    assert loaded.num_tokens.tolist() == [5, 17, 40] and loaded.tokenizer == "bytes"
    # A stored index is read, not recomputed: tamper with it and see the tampered value.
    loaded = LengthIndex(loaded.ids, np.array([1, 2, 3]), loaded.max_new_tokens, "bytes")
    loaded.save(path)
    assert length_index(ds, TOK, path=path).num_tokens.tolist() == [1, 2, 3]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        LengthIndex.load(tmp_path / "bad.json")


def test_synthetic_records_carry_their_token_count():
    ds = synthetic_dataset("passkey", lengths=[300, 500], num_samples=2, seed=0, tokenizer=TOK)
    index = length_index(ds, TOK)
    assert index.num_tokens.tolist() == [len(TOK.encode(r.prompt)) for r in ds]
    assert [r.length for r in ds] == [300, 300, 500, 500]


def test_plan_buckets_and_batches():
    index = LengthIndex(tuple(f"r{i}" for i in range(7)), np.array([3, 9, 10, 11, 30, 2, 16]),
                        np.array([8, 8, 8, 8, 8, 8, 4]), "bytes")
    plan = plan_batches(index, buckets=[32, 8, 16], batch_size=2)
    got = [(b.bucket, b.max_new_tokens, b.indices) for b in plan]
    assert got == [(8, 8, (0, 5)), (16, 4, (6, -1)), (16, 8, (1, 2)), (16, 8, (3, -1)),
                   (32, 8, (4, -1))]
    # Constant token budget: 32 tokens per batch -> 4 rows of 8, 2 of 16, 1 of 32.
    plan = plan_batches(index, buckets=[8, 16, 32], tokens_per_batch=32)
    assert [len(b.indices) for b in plan] == [4, 2, 2, 2, 1]
    # Rows are a multiple of the process count.
    plan = plan_batches(index, buckets=[8, 16, 32], tokens_per_batch=48, process_count=4)
    assert {len(b.indices) for b in plan} == {4}


def test_plan_errors():
    index = LengthIndex(("a", "b"), np.array([3, 40]), np.array([8, 8]), "bytes")
    with pytest.raises(ValueError, match="record 'b' has 40 prompt tokens"):
        plan_batches(index, buckets=[16, 32], batch_size=2)
    with pytest.raises(ValueError, match="exactly one"):
        plan_batches(index, buckets=[64], batch_size=2, tokens_per_batch=64)
    with pytest.raises(ValueError, match="largest bucket"):
        plan_batches(index, buckets=[16], batch_size=2,
                     truncation=Truncation(policy="left", max_tokens=64))
    with pytest.raises(ValueError, match="policy"):
        Truncation(policy="right")
    plan = plan_batches(index, buckets=[16, 32], batch_size=2,
                        truncation=Truncation(policy="middle"))
    assert [(b.bucket, b.indices) for b in plan] == [(16, (0, -1)), (32, (1, -1))]


def test_truncation_policies():
    ids = np.arange(10)
    assert Truncation(policy="middle").apply(ids, 6).tolist() == [0, 1, 2, 7, 8, 9]
    assert Truncation(policy="middle").apply(ids, 7).tolist() == [0, 1, 2, 7, 8, 9]
    assert Truncation(policy="left").apply(ids, 4).tolist() == [6, 7, 8, 9]
    assert Truncation(policy="middle").apply(ids, 10).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="record 'x'"):
        Truncation().apply(ids, 4, record_id="x")


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_encode_batch_pads_and_truncates(pad_side):
    ds = _records([3, 12])
    batch = encode_batch([ds[0], ds[1], None], TOK, bucket=8, max_new_tokens=8,
                         truncation=Truncation(policy="middle"), pad_side=pad_side)
    assert batch["tokens"].shape == (3, 8) and batch["tokens"].dtype == np.int32
    assert batch["lengths"].tolist() == [3, 8, 0] and batch["truncated"].tolist() == [0, 4, 0]
    assert batch["valid"].tolist() == [True, True, False]
    full = TOK.encode(ds[1].prompt)
    row0 = batch["tokens"][0]
    if pad_side == "right":
        assert row0[:3].tolist() == TOK.encode(ds[0].prompt) and (row0[3:] == TOK.pad_id).all()
    else:
        assert row0[5:].tolist() == TOK.encode(ds[0].prompt) and (row0[:5] == TOK.pad_id).all()
    assert batch["tokens"][1].tolist() == full[:4] + full[-4:]
    assert (batch["tokens"][2] == TOK.pad_id).all()


def test_processes_split_rows_of_every_batch():
    ds = _records([4, 5, 6, 7, 12, 13])
    plan = plan_batches(length_index(ds, TOK), buckets=[8, 16], batch_size=4, process_count=2)
    shards = [batch_dataset(ds, plan, TOK, process_index=p, process_count=2) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(plan) == 2
    for k, spec in enumerate(plan):
        rows = np.concatenate([shards[p][k]["indices"] for p in (0, 1)])
        assert rows.tolist() == list(spec.indices)
        assert shards[0][k]["tokens"].shape == (2, spec.bucket)
    with pytest.raises(ValueError, match="process_count=3"):
        batch_dataset(ds, plan, TOK, process_index=0, process_count=3)


def _ids(batch):
    return [r.id if r is not None else None for r in batch["records"]]


def test_iterator_resumes_exactly_through_orbax(tmp_path):
    ds = synthetic_dataset("niah_single_1", lengths=[600, 800], num_samples=3, seed=1,
                           tokenizer=TOK)
    plan = plan_batches(length_index(ds, TOK), buckets=[512, 1024], batch_size=2)
    batches = batch_dataset(ds, plan, TOK, process_index=0, process_count=1)
    straight = [_ids(b) for b in batches.to_iter_dataset()]
    assert len(straight) == 4

    it = iter(batches.to_iter_dataset())
    first = [_ids(next(it)) for _ in range(2)]
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(2, args=grain.checkpoint.CheckpointSave(it))
        manager.wait_until_finished()
    resumed = iter(batches.to_iter_dataset())
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(2, args=grain.checkpoint.CheckpointRestore(resumed))
    assert first + [_ids(b) for b in resumed] == straight


def test_make_record_dispatch():
    r = make_record("niah_single_2", 0, seed=0, length=600, tokenizer=TOK)
    assert r.task == "niah_single_2"
    with pytest.raises(ValueError, match="task='nope'"):
        make_record("nope", 0, seed=0, length=600, tokenizer=TOK)
    grid = synthetic_dataset("niah", lengths=[700], depths=[0.0, 1.0], num_samples=2, seed=0,
                             tokenizer=TOK)
    assert [r.depth for r in grid] == [0.0, 0.0, 1.0, 1.0]
    assert len({r.id for r in grid}) == 4
