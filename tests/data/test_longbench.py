"""LongBench v1 / LongBench-E / v2 readers over the sample JSONL files in tests/fixtures."""

import json
import os

import pytest

from lcm.data import ByteTokenizer
from lcm.data.longbench import (DATASET2MAXLEN, LONGBENCH_E_DATASETS, NO_CHAT, read_longbench,
                                read_longbench_v2)
from lcm.data.longbench_prompts import DATASET2PROMPT

TOK = ByteTokenizer()
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = os.path.join(TESTS, "fixtures", "longbench")


def _path(name):
    return os.path.join(DIR, name)


def test_v1_records_use_the_benchmark_template_and_budget():
    records = read_longbench(_path("qasper.jsonl"), tokenizer=TOK)
    assert [r.id for r in records] == ["longbench/qasper/qasper-0001",
                                       "longbench/qasper/qasper-0002"]
    r = records[0]
    assert r.task == "longbench/qasper" and r.metric == "qa_f1_score" and r.max_new_tokens == 128
    assert r.answers == ("the Harbor corpus", "Harbor corpus") and r.all_classes is None
    assert r.prompt.startswith("You are given a scientific article and a question.")
    assert "Article: We evaluate our tagger" in r.prompt
    assert r.prompt.endswith("Question: Which corpus do the authors evaluate on?\n\nAnswer:")
    assert r.length == len(TOK.encode(r.prompt)) and r.meta["truncated_tokens"] == 0
    assert r.meta["chat"] and r.meta["length_words"] == 27 and r.meta["line"] == 1


def test_v1_chinese_classes_and_no_chat():
    (zh,) = read_longbench(_path("multifieldqa_zh.jsonl"), tokenizer=TOK)
    assert zh.metric == "qa_f1_zh_score" and zh.max_new_tokens == 64
    assert "灰角灯塔" in zh.prompt and zh.prompt.startswith("阅读以下文字并用中文简短回答")
    (trec,) = read_longbench(_path("trec.jsonl"), tokenizer=TOK)
    assert trec.all_classes == ("City", "Individual", "Distance, linear measure", "Date")
    assert trec.metric == "classification_score" and not trec.meta["chat"]
    assert set(NO_CHAT) <= set(DATASET2MAXLEN) and len(DATASET2PROMPT) == 21


def test_longbench_e_buckets():
    records = read_longbench(_path("qasper_e.jsonl"), tokenizer=TOK, e=True)
    assert [r.meta["length_bucket"] for r in records] == ["0-4k", "4-8k", "8k+"]
    assert records[0].task == "longbench_e/qasper" and len(LONGBENCH_E_DATASETS) == 13
    with pytest.raises(ValueError, match="not in LongBench-E"):
        read_longbench(_path("multifieldqa_zh.jsonl"), tokenizer=TOK, e=True)


def test_v1_middle_truncation_is_longbench_s():
    (full,) = read_longbench(_path("trec.jsonl"), tokenizer=TOK)
    ids = TOK.encode(full.prompt)
    (cut,) = read_longbench(_path("trec.jsonl"), tokenizer=TOK, max_length=101)
    half = int(101 / 2)
    assert cut.prompt == TOK.decode(ids[:half]) + TOK.decode(ids[-half:])
    assert cut.length == 100 and cut.meta["truncated_tokens"] == len(ids) - 100
    assert cut.meta["truncation"] == {"policy": "middle", "max_tokens": 101}


def test_v2_records():
    records = read_longbench_v2(_path("longbench_v2.jsonl"), tokenizer=TOK)
    r = records[0]
    assert r.task == "longbench_v2" and r.metric == "extract_choice" and r.max_new_tokens == 128
    assert r.answers == ("A",) and r.meta["difficulty"] == "easy"
    assert r.meta["length_class"] == "short"
    assert "<text>\nThe lighthouse on Grey Point was built in 1881.\n</text>" in r.prompt
    assert "(A) 1881\n(B) 1902" in r.prompt  # fields stripped as pred.py does
    assert r.prompt.endswith('Format your response as follows: "The correct answer is (insert '
                             'answer here)".')
    (cut, *_) = read_longbench_v2(_path("longbench_v2.jsonl"), tokenizer=TOK, max_length=81)
    ids = TOK.encode(r.prompt)
    assert cut.prompt == TOK.decode(ids[:81 // 2] + ids[-81 // 2:])  # v2: one more at the end


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_errors_name_the_file_and_line(tmp_path):
    good = json.dumps({"input": "q", "context": "c", "answers": ["a"], "length": 1,
                       "_id": "x", "dataset": "qasper"})
    with pytest.raises(ValueError, match="missing.jsonl"):
        read_longbench(tmp_path / "missing.jsonl", tokenizer=TOK)
    path = _write(tmp_path, "qasper.jsonl", [good, "", '{"input": "q",'])
    with pytest.raises(ValueError, match=r"qasper.jsonl, line 3: not valid JSON"):
        read_longbench(path, tokenizer=TOK)
    path = _write(tmp_path, "qasper.jsonl", [good, json.dumps({"input": "q"})])
    with pytest.raises(ValueError, match=r"line 2: missing fields \['context', 'answers'"):
        read_longbench(path, tokenizer=TOK)
    path = _write(tmp_path, "qasper.jsonl", [good.replace('["a"]', "[]")])
    with pytest.raises(ValueError, match="line 1: answers=\\[\\]"):
        read_longbench(path, tokenizer=TOK)
    path = _write(tmp_path, "mystery.jsonl", [good.replace('"qasper"', '"mystery"')])
    with pytest.raises(ValueError, match="mystery.jsonl, line 1: dataset 'mystery'"):
        read_longbench(path, tokenizer=TOK)
    path = _write(tmp_path, "v2.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match="v2.jsonl, line 1: a JSON list"):
        read_longbench_v2(path, tokenizer=TOK)
    row = json.loads(open(_path("longbench_v2.jsonl")).readline())
    path = _write(tmp_path, "v2.jsonl", [json.dumps({**row, "answer": "E"})])
    with pytest.raises(ValueError, match="line 1: answer='E'"):
        read_longbench_v2(path, tokenizer=TOK)
