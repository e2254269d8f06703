"""lcm's RULER generators against RULER's own, on the same tokenizer, essay and QA files.

tests/fixtures/data/ruler/ruler_samples.json holds samples made by RULER's prepare.py (see
make_ruler_fixtures.py there). Random draws differ (RULER uses Python's global random state), so
the checks are on everything else: the prompt around the context (templates, singular wording,
answer prefix, query joining, few-shot and in-context examples) with random keys and values
masked, the answers' form, the haystack, and the token budget (prompt + generation <= length,
filled at least as tightly as RULER fills it).
"""

import functools
import json
import os
import re

import pytest

from lcm.data import HFTokenizer, make_record
from lcm.data.haystack import NOISE, essay_words

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = os.path.join(TESTS, "fixtures", "data")
FIXTURES = json.load(open(os.path.join(DIR, "ruler", "ruler_samples.json"), encoding="utf-8"))
QA_FILES = {"qa_1": os.path.join(DIR, "squad_tiny.json"),
            "qa_2": os.path.join(DIR, "hotpotqa_tiny.json")}
CASES = [(run["task"], run["max_seq_length"], i) for run in FIXTURES["runs"]
         for i in range(len(run["samples"]))]
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
MASKS = [(UUID, "<U>"), (r"(?:\d+\. [^\s]+ ?)+", "<LIST> "), (r"\d+", "<N>"),
         (r"\b[a-z]+-[a-z]+\b", "<W>"), (r"\b(?!VAR\b)[A-Z]{3,5}\b", "<V>")]


@functools.cache
def tokenizer():
    return HFTokenizer(os.path.join(DIR, "ruler", "tokenizer.json"))


def mask(text):
    # Haystack lines go (vt's in-context example has as many as fit its own 500-token budget).
    text = text.replace(NOISE + "\n", "")
    for pattern, repl in MASKS:
        text = re.sub(pattern, repl, text)
    return text


def ruler_sample(task, length, i):
    run = next(r for r in FIXTURES["runs"] if r["task"] == task and r["max_seq_length"] == length)
    return run["samples"][i]


def lcm_record(task, length, i):
    extra = {"path": QA_FILES[task]} if task in QA_FILES else {}
    return make_record(task, i, seed=42, length=length, tokenizer=tokenizer(), **extra)


@pytest.mark.parametrize("task,length,i", CASES)
def test_prompt_frame_matches_ruler(task, length, i):
    sample, record = ruler_sample(task, length, i), lcm_record(task, length, i)
    ruler_prompt = sample["input"] + sample["answer_prefix"]
    pre, post = record.prompt.split(record.context)
    assert record.meta["answer_prefix"] == record.prompt[-len(record.meta["answer_prefix"]):]
    assert mask(ruler_prompt).startswith(mask(pre)), (mask(pre)[-300:], mask(ruler_prompt)[:600])
    assert mask(ruler_prompt).endswith(mask(post)), (mask(post), mask(ruler_prompt)[-300:])


@pytest.mark.parametrize("task,length,i", CASES)
def test_budget_is_filled_like_ruler(task, length, i):
    sample, record = ruler_sample(task, length, i), lcm_record(task, length, i)
    total = len(tokenizer().encode(record.prompt)) + record.max_new_tokens
    assert sample["length"] <= length and total <= length
    # RULER's length counts prompt + tokens_to_generate too; lcm fills at least as much
    # (RULER steps an overflowing sample down by a fixed increment), up to draw differences.
    assert total >= sample["length"] - 0.03 * length, (total, sample["length"])


@pytest.mark.parametrize("task,length,i", CASES)
def test_answers_have_ruler_s_form(task, length, i):
    sample, record = ruler_sample(task, length, i), lcm_record(task, length, i)
    ruler_answers, answers = sample["outputs"], list(record.answers)
    assert len(answers) == len(ruler_answers)
    if task.startswith("qa"):
        assert answers == ruler_answers  # the same question of the same file
        assert record.question in sample["input"]
        return
    if task == "cwe":  # ten words of the word lists (RULER's raw lists also hold "ad hoc")
        assert all(re.fullmatch(r"[a-z]+", w) for w in answers)
        assert all(re.fullmatch(r"[a-z][a-z '-]*", w) for w in ruler_answers)
        return
    if task == "fwe":  # three coded words of coded_wordlen 6
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in answers + ruler_answers)
        return
    for ours, theirs in zip(answers, ruler_answers):
        assert mask(ours) == mask(theirs)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
def test_haystacks_are_ruler_s(task):
    sample, record = ruler_sample(task, 4096, 0), lcm_record(task, 4096, 0)
    # RULER's word keys come from wonderwords' raw lists, some with spaces ("ad hoc-...").
    needle = re.compile(r"One of the special magic \w+ for .+? is: \S+\.")
    for prompt in (sample["input"], record.prompt):
        context = prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat", 1)[0]
        rest = needle.sub(" ", context)
        if task == "niah_single_1":
            assert set(rest.split("\n")) - {" ", ""} == {NOISE}
        elif task == "niah_single_2":
            words = rest.split()
            assert words == essay_words(len(words))
        else:
            assert rest.replace("\n", "").strip() == ""
