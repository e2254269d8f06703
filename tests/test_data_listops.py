"""LRA ListOps integer inputs: the ids of LRA's own input pipeline (fixture from TensorFlow
Datasets' TokenTextEncoder, tests/fixtures/listops_lra/make_fixture.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from lcm.data.listops import LRA_VOCAB, PAD_ID, ListOpsEncoder, lra_source, make_listops

FIXTURE = Path(__file__).parent / "fixtures" / "listops_lra" / "lra_ids.json"


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
