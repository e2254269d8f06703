"""RULER's vt, cwe, fwe and qa generators: RULER's structure, exact budgets, pure functions."""

import collections
import json
import os
import re

import pytest

from lcm.data import ByteTokenizer
from lcm.data.ruler import load_hotpotqa, load_squad, make_cwe, make_fwe, make_qa, make_vt

TOK = ByteTokenizer()
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(TESTS, "fixtures", "data")
SQUAD = os.path.join(FIXTURES, "squad_tiny.json")
HOTPOT = os.path.join(FIXTURES, "hotpotqa_tiny.json")


def _fits(r, length, slack):
    n = len(TOK.encode(r.prompt))
    assert n == r.meta["num_tokens"]
    assert length - slack < n + r.max_new_tokens <= length


def test_vt_chain_resolves_to_the_answer():
    r = make_vt(2, seed=42, length=2500, tokenizer=TOK)
    assert r == make_vt(2, seed=42, length=2500, tokenizer=TOK)
    _fits(r, 2500, 100)
    assert r.max_new_tokens == 30 and len(r.answers) == 5
    # Follow the chain in the context: every answer variable holds the queried value.
    value = {}
    for line in r.context.split("\n"):
        if m := re.fullmatch(r"VAR (\w+) = (\d+)", line.strip()):
            value[m[1]] = m[2]
        elif m := re.fullmatch(r"VAR (\w+) = VAR (\w+)", line.strip()):
            value[m[1]] = value[m[2]]
    query = re.search(r"assigned the value (\d+) in the text above", r.question)[1]
    assert sorted(v for v, x in value.items() if x == query) == sorted(r.answers)
    assert all(len(v) == 5 and v.isupper() for v in r.answers)
    # One in-context example with 3-letter names and its answer, before the task.
    example, task = r.prompt.split("\n\nMemorize and track", 1)[0], r.prompt
    assert task.count("Memorize and track the chain(s)") == 2
    assert re.search(r"they are:  (?:[A-Z]{3} ){4}[A-Z]{3}\n", r.prompt)
    assert "12345" not in example


def test_cwe_counts():
    r = make_cwe(0, seed=1, length=12000, tokenizer=TOK)  # bytes: ~4 per token of a real one
    _fits(r, 12000, 60)
    words = re.findall(r"\d+\. (\S+)", r.context)
    counts = collections.Counter(words)
    assert sorted(w for w, c in counts.items() if c == 30) == sorted(r.answers)
    assert set(counts.values()) == {30, 3} and len(r.answers) == 10
    assert r.prompt.count("Below is a numbered list of words.") == 2  # one few-shot example
    short = make_cwe(0, seed=1, length=3000, tokenizer=TOK)
    assert set(collections.Counter(re.findall(r"\d+\. (\S+)", short.context)).values()) == {6, 1}


def test_fwe_zipf_top_three():
    r = make_fwe(0, seed=3, length=4000, tokenizer=TOK)
    _fits(r, 4000, 20)
    counts = collections.Counter(r.context.split())
    top = [w for w, _ in counts.most_common(4)]
    assert top[0] == "..." and top[1:] == list(r.answers)
    assert all(len(w) == 6 for w in r.answers)


def test_qa_squad_and_hotpotqa():
    qas, docs = load_squad(SQUAD)
    assert [q["query"] for q in qas][:1] == ["When was the Grey Point lighthouse built?"]
    assert len(qas) == 3 and len(docs) == 5  # the impossible question is dropped
    r = make_qa(0, seed=0, length=700, tokenizer=TOK, path=SQUAD)
    assert r.task == "qa_1" and r.answers == ("1881", "in 1881")
    assert r.metric == "string_match_part" and r.max_new_tokens == 32
    assert "built in 1881" in r.context and r.prompt.endswith("lighthouse built? Answer:")
    _fits(r, 700, 200)
    # More room -> more distractor documents, gold always kept.
    big = make_qa(0, seed=0, length=2000, tokenizer=TOK, path=SQUAD)
    assert big.meta["num_docs"] > r.meta["num_docs"] and "built in 1881" in big.context
    h = make_qa(0, seed=0, length=900, tokenizer=TOK, path=HOTPOT, dataset="hotpotqa")
    assert h.task == "qa_2" and h.answers == ("the Marrow",)
    assert "Ashby is a market town" in h.context and "The bell foundry stands" in h.context
    assert len(load_hotpotqa(HOTPOT)[1]) == 5  # the shared "Clock tower" page once


def test_qa_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="missing.json"):
        make_qa(0, seed=0, length=900, tokenizer=TOK, path=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [\n{"title": 1,\n oops}]}')
    with pytest.raises(ValueError, match=r"bad.json, line 3"):
        make_qa(0, seed=0, length=900, tokenizer=TOK, path=bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"data": [{"title": "x"}]}))
    with pytest.raises(ValueError, match="wrong.json: not in SQuAD format"):
        make_qa(0, seed=0, length=900, tokenizer=TOK, path=wrong)
    with pytest.raises(ValueError, match="index=9"):
        make_qa(9, seed=0, length=900, tokenizer=TOK, path=SQUAD)
    with pytest.raises(ValueError, match="dataset="):
        make_qa(0, seed=0, length=900, tokenizer=TOK, path=SQUAD, dataset="nq")
