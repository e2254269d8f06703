"""LRA ListOps: the ids of LRA's own input pipeline (fixture from TensorFlow Datasets'
TokenTextEncoder, tests/fixtures/listops_lra/make_fixture.py), LRA's TSV files, and the Grain
pipeline of examples and batches."""

import dataclasses
import json
from pathlib import Path

import grain
import numpy as np
import pytest

from lcm.data import (LRA_VOCAB, ByteTokenizer, ListOpsEncoder, listops_batches,
                      listops_examples, make_listops, read_lra_listops)
from lcm.data.listops import PAD_ID, lra_source

FIXTURE = Path(__file__).parents[1] / "fixtures" / "listops_lra" / "lra_ids.json"


def test_encoder_gives_lra_ids():
    data = json.loads(FIXTURE.read_text())
    assert tuple(data["vocab"]) == LRA_VOCAB
    encoder = ListOpsEncoder()
    assert encoder.vocab_size == data["vocab_size"] == 17
    assert len(data["sources"]) == len(data["ids"]) == 11
    for source, ids in zip(data["sources"], data["ids"]):
        assert encoder.encode(source) == ids, source[:40]
    assert data["ids"][-1][0] == len(LRA_VOCAB) + 1  # "[FOO": split, "FOO" out of vocabulary
    short = ListOpsEncoder(max_length=data["short_max_length"])
    assert short.encode(data["sources"][0]) == data["short_ids"]


def test_batches_are_zero_padded_symbol_ids():
    records = [make_listops(i, seed=5, length=1000, min_length=50) for i in range(3)]
    encoder = ListOpsEncoder(max_length=1000)
    batch = encoder.encode_batch([r.context for r in records])
    assert batch.shape == (3, 1000) and batch.dtype == np.int32
    for row, r in zip(batch, records):
        n = r.meta["listops_length"]  # one id per symbol: parentheses are dropped
        assert (row[:n] > PAD_ID).all() and (row[n:] == PAD_ID).all()
        symbols = lra_source(r.context).split()
        assert [LRA_VOCAB[i - 1] for i in row[:n]] == symbols
    assert "X" in LRA_VOCAB and "]" not in LRA_VOCAB


def test_vocab_order_is_a_parameter_and_checked():
    order = tuple(sorted(LRA_VOCAB))
    source = "( ( [MAX 2 ) 9 ) ]"
    assert ListOpsEncoder(vocab=order).encode(source) == [
        order.index(t) + 1 for t in ("[MAX", "2", "9", "X")]
    with pytest.raises(ValueError, match="vocab="):
        ListOpsEncoder(vocab=("1", "1"))
    with pytest.raises(ValueError, match="max_length=0"):
        ListOpsEncoder(max_length=0)


def _write_tsv(path, rows, header="Source\tTarget"):
    path.write_text(header + "\n" + "".join(f"{s}\t{t}\n" for s, t in rows))
    return path


def test_lra_files_read_into_the_generators_records(tmp_path):
    made = [make_listops(i, seed=3, length=400, min_length=20) for i in range(3)]
    path = _write_tsv(tmp_path / "basic_test.tsv", [(r.context, r.answers[0]) for r in made])
    read = read_lra_listops(path)
    assert [r.id for r in read] == [f"listops/lra/basic_test.tsv/line={n}" for n in (2, 3, 4)]
    for got, want in zip(read, made):
        assert (got.task, got.context, got.prompt, got.answers, got.metric, got.max_new_tokens) \
            == (want.task, want.context, want.prompt, want.answers, want.metric,
                want.max_new_tokens)
        assert got.meta["listops_length"] == want.meta["listops_length"]
    tok = ByteTokenizer()
    assert read_lra_listops(path, tokenizer=tok)[0].meta["num_tokens"] == \
        len(tok.encode(made[0].prompt))


def test_lra_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_lra_listops(tmp_path / "missing.tsv")
    with pytest.raises(ValueError, match=r"bad.tsv, line 1: header \['Input', 'Label'\]"):
        read_lra_listops(_write_tsv(tmp_path / "bad.tsv", [], header="Input\tLabel"))
    rows = [("( [MAX 2 9 ] )", "9"), ("( [MIN 2 9 ] )", "12")]
    with pytest.raises(ValueError, match=r"worse.tsv, line 3: .*value 0-9"):
        read_lra_listops(_write_tsv(tmp_path / "worse.tsv", rows))


def test_examples_are_lra_inputs_and_targets():
    records = [make_listops(i, seed=1, length=300, min_length=20) for i in range(4)]
    encoder = ListOpsEncoder(max_length=300)
    examples = listops_examples(records, encoder=encoder)
    want = encoder.encode_batch([r.context for r in records])
    for i, r in enumerate(records):
        assert np.array_equal(examples[i]["inputs"], want[i])
        assert examples[i]["targets"] == int(r.answers[0])
    with pytest.raises(ValueError, match="expected a ListOps record"):
        listops_examples([dataclasses.replace(records[0], answers=("12",))])[0]


def test_batches_cover_every_record_once_over_processes_and_resume():
    records = grain.MapDataset.source(
        [make_listops(i, seed=2, length=200, min_length=10) for i in range(7)])
    encoder = ListOpsEncoder(max_length=200)
    shards = [listops_batches(records, batch_size=4, encoder=encoder, process_index=p,
                              process_count=2) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2
    seen = []
    for k in range(2):
        for p in range(2):
            batch = shards[p][k]
            assert batch["inputs"].shape == (2, 200) and batch["targets"].shape == (2,)
            for row, i in enumerate(batch["indices"]):
                if i < 0:
                    assert not batch["valid"][row] and not batch["inputs"][row].any()
                    continue
                assert batch["valid"][row]
                seen.append(int(i))
                assert np.array_equal(batch["inputs"][row],
                                      encoder.encode_batch([records[int(i)].context])[0])
                assert batch["targets"][row] == int(records[int(i)].answers[0])
    assert seen == list(range(7))  # global order: batch, then process
    one = listops_batches(records, batch_size=4, encoder=encoder, process_index=0,
                          process_count=1)
    it = iter(one.to_iter_dataset())
    next(it)
    state = it.get_state()
    again = iter(one.to_iter_dataset())
    again.set_state(state)
    assert np.array_equal(next(again)["inputs"], next(it)["inputs"])
    with pytest.raises(ValueError, match="batch_size=3"):
        listops_batches(records, batch_size=3, process_index=0, process_count=2)
