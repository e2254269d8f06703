"""lcm.data.Record: validation and JSON round trip."""

import pytest

from lcm.data import Record, record_id


def _record(**kw):
    base = dict(id="t/0", task="passkey", context="ctx", question="q?", prompt="ctx q?",
                answers=("42",), length=128, max_new_tokens=8, metric="exact_match")
    return Record(**{**base, **kw})


def test_round_trip_keeps_every_field():
    r = _record(all_classes=["a", "b"], depth=0.25, meta={"needles": [1, 2], "zh": "中文"})
    back = Record.from_json(r.to_json())
    assert back == r
    assert back.answers == ("42",) and back.all_classes == ("a", "b")
    assert "中文" in r.to_json()  # non-ASCII kept


@pytest.mark.parametrize("kw,match", [
    (dict(id=""), "id"),
    (dict(answers="42"), "answers"),
    (dict(answers=(1,)), "answers"),
    (dict(length=-1), "length"),
    (dict(depth=1.5), "depth"),
    (dict(depth=float("nan")), "depth"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(meta=[]), "meta"),
    (dict(all_classes="ab"), "all_classes"),
])
def test_invalid_fields_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _record(**kw)


def test_unknown_field_in_json_raises():
    d = _record().to_dict()
    d["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        Record.from_dict(d)


def test_record_id_is_stable_and_sorted():
    got = record_id("niah", 4096, 7, 42, depth=0.5, a=1)
    assert got == "niah/len=4096/seed=42/a=1/depth=0.5/idx=7"
