"""InfiniteBench retrieval, LRA ListOps and SCBench-style sessions."""

import json
import re

import pytest

from lcm.data import ByteTokenizer
from lcm.data.infinitebench import make_infinitebench_passkey, make_kv_retrieval, make_number_string
from lcm.data.listops import END, OPERATORS, make_listops, to_value
from lcm.data.scbench import flatten_sessions, make_kv_session, make_niah_session

TOK = ByteTokenizer()


@pytest.mark.parametrize("make,budget", [(make_infinitebench_passkey, 6),
                                         (make_number_string, 12)])
def test_infinitebench_digit_tasks(make, budget):
    r = make(1, seed=0, length=1500, tokenizer=TOK, depth=0.5)
    assert r == make(1, seed=0, length=1500, tokenizer=TOK, depth=0.5)
    n = len(TOK.encode(r.prompt))
    assert n == r.meta["num_tokens"] and 1500 - 100 < n + budget <= 1500
    assert r.max_new_tokens == budget and r.metric == "first_int_match"
    key = r.answers[0]
    assert re.fullmatch(r"\d{5}" if budget == 6 else r"\d{10}", key)
    lines = r.context.split("\n")
    hit = next(i for i, line in enumerate(lines) if key in line)
    assert abs(hit / r.meta["num_noise"] - 0.5) < 0.1
    if budget == 12:  # five digits duplicated in place: at least five adjacent repeats
        assert sum(a == b for a, b in zip(key, key[1:])) >= 5


def test_kv_retrieval():
    r = make_kv_retrieval(0, seed=0, length=2000, tokenizer=TOK, depth=0.0)
    pairs = json.loads(r.context[len("JSON data:\n"):])
    key = re.search(r'Key: "([0-9a-f-]{36})"', r.prompt)[1]
    assert pairs[key] == r.answers[0] and list(pairs).index(key) == 0
    assert r.metric == "kv_retrieval_match" and r.max_new_tokens == 50
    assert len(TOK.encode(r.prompt)) + 50 <= 2000
    deep = make_kv_retrieval(0, seed=0, length=2000, tokenizer=TOK, depth=1.0)
    pairs = json.loads(deep.context[len("JSON data:\n"):])
    assert list(pairs.values())[-1] == deep.answers[0]


def _evaluate(source):
    """An independent evaluator over the string form (not LRA's to_value)."""
    tokens = [t for t in source.split() if t not in "()"]
    stack = []
    for t in tokens:
        if t in OPERATORS:
            stack.append([t])
        elif t == END:
            op, *args = stack.pop()
            value = {"[MIN": min, "[MAX": max, "[SM": lambda a: sum(a) % 10,
                     "[MED": lambda a: int(sorted(a)[len(a) // 2] if len(a) % 2 else
                                           (sorted(a)[len(a) // 2 - 1]
                                            + sorted(a)[len(a) // 2]) / 2)}[op](args)
            if stack:
                stack[-1].append(value)
            else:
                return value
        else:
            stack[-1].append(int(t))


def test_listops_values_and_lengths():
    for i in range(5):
        r = make_listops(i, seed=3, length=2000)
        symbols = [t for t in r.context.split() if t not in "()"]
        assert 500 < len(symbols) == r.meta["listops_length"] < 2000
        assert r.answers == (str(_evaluate(r.context)),)
        assert r.metric == "exact_match" and r.prompt.endswith(r.context + "\nAnswer:")
    assert to_value(((("[SM", 7), 5), END)) == 2
    assert to_value(((("[MED", 1), 8), END)) == 4  # int(np.median([1, 8])), as LRA
    with pytest.raises(ValueError, match="min_length"):
        make_listops(0, seed=0, length=100, min_length=500)


def test_kv_session_shares_one_prefix():
    session = make_kv_session(0, seed=0, length=2500, tokenizer=TOK, num_turns=3)
    prefix = session[0].meta["shared_prefix"]
    assert len(session) == 3 and len({r.context for r in session}) == 1
    for t, r in enumerate(session):
        assert r.prompt == prefix + r.meta["query"] and r.meta["turn"] == t
        pairs = json.loads(r.context[len("JSON data:\n"):])
        key = re.search(r'Key: "([0-9a-f-]{36})"', r.meta["query"])[1]
        assert pairs[key] == r.answers[0]
    total = len(TOK.encode(prefix)) + sum(len(TOK.encode(r.meta["query"])) for r in session)
    assert total == session[0].meta["num_tokens"] and total + 3 * 50 <= 2500
    assert len({r.id for r in session}) == 3


def test_niah_session_and_flatten():
    sessions = [make_niah_session(i, seed=0, length=3000, tokenizer=TOK) for i in range(2)]
    records = flatten_sessions(sessions)
    assert len(records) == 8
    for r in records:
        key = re.search(r"number for (\S+) mentioned", r.meta["query"])[1]
        assert f"One of the special magic numbers for {key} is: {r.answers[0]}." in r.context
    with pytest.raises(ValueError, match="ending with"):
        make_niah_session(0, seed=0, length=3000, tokenizer=TOK, template="{task_template}!")


def test_registry_covers_the_tasks():
    from lcm.data import GENERATORS, RULER_TASKS, SESSIONS, synthetic_dataset
    assert len(RULER_TASKS) == 13 and set(RULER_TASKS) <= set(GENERATORS)
    for task in ("passkey", "niah", "infinitebench/passkey", "infinitebench/number_string",
                 "infinitebench/kv_retrieval", "listops"):
        assert task in GENERATORS
    sessions = synthetic_dataset("scbench_kv", lengths=[1500], num_samples=2, seed=0,
                                 tokenizer=TOK, num_turns=2)
    assert set(SESSIONS) == {"scbench_kv", "scbench_niah"}
    assert [len(s) for s in sessions] == [2, 2] and sessions[1][0].meta["index"] == 1
    ib = synthetic_dataset("infinitebench/passkey", lengths=[800], depths=[0.0, 1.0],
                           num_samples=1, seed=0, tokenizer=TOK)
    assert [r.depth for r in ib] == [0.0, 1.0]
