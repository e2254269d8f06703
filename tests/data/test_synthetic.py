"""Passkey and needle-in-a-haystack generators: pure functions of (seed, index), exact budgets,
needles where the depth says, RULER's wording."""

import dataclasses
import functools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lcm.data import ByteTokenizer
from lcm.data.niah import (RULER_NIAH, depth_grid, make_niah, make_ruler_niah, needle_depths,
                           niah_record)
from lcm.data.passkey import make_passkey, passkey_prompt

TOK = ByteTokenizer()


@functools.cache
def smollm2_tokenizer():
    from lcm.io import gguf  # reads the tokenizer only (no weights)
    path = gguf.smollm2_path()
    return gguf._tokenizer(gguf._metadata(gguf._open(path)), path)


def test_passkey_is_pure_and_fits_exactly():
    a = make_passkey(5, seed=1, length=600, tokenizer=TOK)
    assert a == make_passkey(5, seed=1, length=600, tokenizer=TOK)
    assert a != make_passkey(6, seed=1, length=600, tokenizer=TOK)
    assert a.answers[0] != make_passkey(5, seed=2, length=600, tokenizer=TOK).answers[0]
    n = len(TOK.encode(a.prompt))
    assert n == a.meta["num_tokens"] and n + a.max_new_tokens <= 600
    # One more filler character would not fit: the fit is exact.
    longer, _ = passkey_prompt(int(a.answers[0]), a.meta["filler_chars"] + 1, a.depth)
    assert len(TOK.encode(longer)) + a.max_new_tokens > 600
    key = a.answers[0]
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in a.prompt
    assert a.prompt.endswith("What is the pass key? The pass key is")
    assert 1 <= int(key) <= 50000


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_depth_places_the_key(depth):
    r = make_passkey(0, seed=0, length=2000, tokenizer=TOK, depth=depth)
    prefix = r.context.split("\nThe pass key is")[0]
    assert len(prefix) == round(depth * r.meta["filler_chars"])
    assert r.depth == depth and "depth=" in r.id


def test_template_is_fitted_too():
    template = "<|user|>\n{task_template}<|end|>\n<|assistant|>\n"
    r = make_passkey(0, seed=0, length=700, tokenizer=TOK, template=template)
    assert r.prompt.startswith("<|user|>\nThere is") and r.prompt.endswith("<|assistant|>\n")
    assert len(TOK.encode(r.prompt)) + r.max_new_tokens <= 700


@pytest.mark.parametrize("task", sorted(RULER_NIAH))
def test_ruler_niah_records(task):
    spec = RULER_NIAH[task]
    r = make_ruler_niah(task, 3, seed=42, length=1500, tokenizer=TOK)
    assert r == make_ruler_niah(task, 3, seed=42, length=1500, tokenizer=TOK)
    assert len(TOK.encode(r.prompt)) == r.meta["num_tokens"]
    assert r.meta["num_tokens"] + r.max_new_tokens <= 1500
    # Within one haystack unit of the budget (a noise line, a needle, or an essay word).
    assert r.meta["num_tokens"] > 1500 - r.max_new_tokens - 120
    assert len(r.answers) == spec.num_needle_q * spec.num_needle_v
    for answer in r.answers:
        assert answer in r.context
    for key in r.meta["query_keys"]:
        assert key in r.prompt.split("\n")[-1]
    assert r.max_new_tokens == 128 and r.metric == "string_match_all"
    single = spec.num_needle_q * spec.num_needle_v == 1
    assert r.prompt.startswith("A special magic" if single else "Some special magic")
    assert r.prompt.endswith("mentioned in the provided text " + ("is" if single else "are"))


def test_niah_haystacks_differ_by_task():
    noise = make_ruler_niah("niah_single_1", 0, seed=0, length=800, tokenizer=TOK)
    essay = make_ruler_niah("niah_single_2", 0, seed=0, length=800, tokenizer=TOK)
    needle = make_ruler_niah("niah_multikey_2", 0, seed=0, length=800, tokenizer=TOK)
    assert "The grass is green." in noise.context and "The grass" not in essay.context
    # Distractor needles: every line is a needle, only one with the queried key.
    lines = needle.context.split("\n")
    assert all(line.startswith("One of the special magic numbers for") for line in lines)
    assert sum(needle.meta["query_keys"][0] in line for line in lines) == 1


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_niah_grid_depth(depth):
    r = make_niah(0, seed=0, length=6000, tokenizer=TOK, depth=depth)
    position = r.context.index("One of the special magic") / len(r.context)
    assert abs(position - depth) < 0.05
    assert r.depth == depth and r.task == "niah"


def test_multi_needle_placement_and_answers():
    assert needle_depths(0.4, 3) == pytest.approx([0.4, 0.6, 0.8])
    r = make_niah(1, seed=0, length=6000, tokenizer=TOK, depth=0.4, num_needles=3)
    assert r.task == "niah_3needles" and len(r.answers) == 3
    positions = sorted(r.context.index(a) / len(r.context) for a in r.answers)
    assert positions == pytest.approx([0.4, 0.6, 0.8], abs=0.05)
    assert r.prompt.startswith("Some special magic numbers")


def test_depth_grid():
    assert depth_grid(5) == (0.0, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(ValueError, match="num_depths"):
        depth_grid(0)


@pytest.mark.parametrize("call,match", [
    (lambda: make_passkey(0, seed=0, length=100, tokenizer=TOK), "passkey at length=100"),
    (lambda: make_passkey(0, seed=0, length=10, tokenizer=TOK), "no room"),
    (lambda: make_passkey(0, seed=-1, length=1000, tokenizer=TOK), "seed"),
    (lambda: make_passkey(0, seed=0, length=1000, tokenizer=TOK, depth=2.0), "depth"),
    (lambda: make_passkey(0, seed=0, length=1000, tokenizer=TOK, template="x"), "template"),
    (lambda: make_ruler_niah("niah_single_9", 0, seed=0, length=1000, tokenizer=TOK), "task"),
    (lambda: make_niah(0, seed=0, length=1000, tokenizer=TOK, depth=0.5, haystack="x"),
     "haystack"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_records_are_frozen():
    r = make_passkey(0, seed=0, length=600, tokenizer=TOK)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.prompt = ""


@pytest.mark.slow
def test_model_tokenizer_budget():
    tok = smollm2_tokenizer()
    for make in (functools.partial(make_passkey, 0),
                 functools.partial(make_ruler_niah, "niah_multikey_3", 0),
                 functools.partial(niah_record, "niah", RULER_NIAH["niah_single_2"], 0)):
        r = make(seed=0, length=2048, tokenizer=tok)
        n = len(tok.encode(r.prompt))
        assert n == r.meta["num_tokens"] and 2048 - 40 < n + r.max_new_tokens <= 2048
        assert re.search(r"\d|[0-9a-f-]{36}", r.answers[0])


@given(st.lists(st.integers(0, 40), min_size=1, max_size=300), st.integers(0, 3000),
       st.integers(0, 50))
def test_fit_largest_is_the_largest_fit(steps, budget, lo):
    """For any non-decreasing cost, fit_largest returns the largest n >= lo within budget."""
    from lcm.data.fit import fit_largest

    base = 5

    def cost(n):  # non-decreasing, flat after the listed steps
        return base + sum(steps[:n])

    if cost(lo) > budget:
        with pytest.raises(ValueError, match="shortest prompt"):
            fit_largest(cost, budget, lo=lo)
        return
    if cost(len(steps)) <= budget:  # flat from there on: no largest n
        with pytest.raises(ValueError, match="does not grow"):
            fit_largest(cost, budget, lo=lo, max_n=10**6)
        return
    n, c = fit_largest(cost, budget, lo=lo)
    assert c == cost(n) <= budget and n >= lo and cost(n + 1) > budget
