"""Readers for LongBench v1, LongBench-E and LongBench v2 JSONL files on local disk.

Nothing is downloaded: point a reader at a file you have (e.g. exported from the Hugging Face
dataset `THUDM/LongBench` / `THUDM/LongBench-v2` as JSONL). Each line becomes a `Record` whose
prompt is built with the benchmark's own template (`longbench_prompts.py`) and whose generation
budget is the benchmark's (`DATASET2MAXLEN`; 128 for v2). `metric` names the per-sample function of
`lcm.eval.metrics` that LongBench's eval.py uses for the dataset ("extract_choice" for v2), and
`task` is "longbench/<dataset>", "longbench_e/<dataset>" or "longbench_v2".

Truncation is LongBench's: with `max_length`, a prompt of more tokens keeps its first and last
halves (v1: `int(max_length / 2)` tokens each; v2: `ids[:max_len // 2] + ids[-max_len // 2:]`),
decoded back to text; the record's meta says what was cut. `length` is the prompt's token count
after truncation, with the tokenizer given; meta keeps the file's own `length` (words or
characters for v1; "short"/"medium"/"long" for v2) and, for LongBench-E, its bucket.
"""

from __future__ import annotations

import os

from lcm.data.jsonl import read_jsonl
from lcm.data.longbench_prompts import DATASET2PROMPT, V2_0SHOT
from lcm.data.records import Record
from lcm.data.tokenizers import tokenizer_name

DATASET2MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512,
    "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}
DATASET2METRIC = {
    "narrativeqa": "qa_f1_score", "qasper": "qa_f1_score", "multifieldqa_en": "qa_f1_score",
    "multifieldqa_zh": "qa_f1_zh_score", "hotpotqa": "qa_f1_score", "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score", "dureader": "rouge_zh_score", "gov_report": "rouge_score",
    "qmsum": "rouge_score", "multi_news": "rouge_score", "vcsum": "rouge_zh_score",
    "trec": "classification_score", "triviaqa": "qa_f1_score", "samsum": "rouge_score",
    "lsht": "classification_score", "passage_retrieval_en": "retrieval_score",
    "passage_count": "count_score", "passage_retrieval_zh": "retrieval_zh_score",
    "lcc": "code_sim_score", "repobench-p": "code_sim_score",
}
# pred.py builds no chat prompt for these ("chat models are better off without").
NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
LONGBENCH_E_DATASETS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report",
                        "multi_news", "trec", "triviaqa", "samsum", "passage_count",
                        "passage_retrieval_en", "lcc", "repobench-p")
V1_FIELDS = ("input", "context", "answers", "length", "_id")
V2_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A",
             "choice_B", "choice_C", "choice_D", "answer", "context")
V2_MAX_NEW_TOKENS = 128


def longbench_e_bucket(length_words: int) -> str:
    """LongBench-E's bucket of a sample's `length`: '0-4k' (< 4000), '4-8k' (< 8000), '8k+'."""
    return "0-4k" if length_words < 4000 else "4-8k" if length_words < 8000 else "8k+"


def _decode(tokenizer, ids) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # a tokenizer whose decode takes no such option
        return tokenizer.decode(ids)


def _truncate(tokenizer, prompt, max_length, version):
    """(prompt, tokens before, tokens dropped) under LongBench's middle truncation."""
    ids = list(tokenizer.encode(prompt))
    if max_length is None or len(ids) <= max_length:
        return prompt, len(ids), 0
    if version == 1:
        half = int(max_length / 2)
        head, tail = ids[:half], ids[-half:]
        prompt = _decode(tokenizer, head) + _decode(tokenizer, tail)
    else:
        head, tail = ids[:max_length // 2], ids[-max_length // 2:]
        prompt = _decode(tokenizer, head + tail)
    return prompt, len(ids), len(ids) - len(head) - len(tail)


def _dataset_of(path, row, number, dataset):
    name = dataset or row.get("dataset") or os.path.basename(os.fspath(path)).split(".")[0]
    if name.endswith("_e") and name[:-2] in DATASET2PROMPT:
        name = name[:-2]
    if name not in DATASET2PROMPT:
        raise ValueError(f"{os.fspath(path)}, line {number}: dataset {name!r} is not a LongBench "
                         f"dataset; expected one of {sorted(DATASET2PROMPT)} (from the "
                         f"`dataset` argument, the line's `dataset` field or the file name)")
    return name


def _check_answers(path, number, row, key="answers"):
    answers = row[key]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str)
                                                              for a in answers):
        raise ValueError(f"{os.fspath(path)}, line {number}: {key}={answers!r}; expected a "
                         f"non-empty list of strings")
    return tuple(answers)


def read_longbench(path, *, tokenizer, dataset: str | None = None, max_length: int | None = None,
                   e: bool = False) -> list[Record]:
    """Records of a LongBench v1 (or, with e=True, LongBench-E) JSONL file.

    dataset: which of the 21 datasets (default: each line's `dataset` field, else the file name,
    e.g. 'qasper.jsonl' or 'qasper_e.jsonl'). max_length: LongBench's prompt token cap (its
    `model2maxlen`), None for no truncation.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length}; expected None or an int >= 2")
    records, name = [], tokenizer_name(tokenizer)
    for number, row in read_jsonl(path, required=V1_FIELDS):
        ds = _dataset_of(path, row, number, dataset)
        if e and ds not in LONGBENCH_E_DATASETS:
            raise ValueError(f"{os.fspath(path)}, line {number}: {ds!r} is not in LongBench-E; "
                             f"expected one of {list(LONGBENCH_E_DATASETS)}")
        answers = _check_answers(path, number, row)
        try:
            prompt = DATASET2PROMPT[ds].format(**row)
        except (KeyError, IndexError) as err:
            raise ValueError(f"{os.fspath(path)}, line {number}: the {ds} template needs field "
                             f"{err}") from err
        prompt, num_tokens, dropped = _truncate(tokenizer, prompt, max_length, 1)
        classes = row.get("all_classes")
        meta = {"dataset": ds, "language": row.get("language"), "_id": row["_id"],
                "length_words": row["length"], "chat": ds not in NO_CHAT,
                "num_tokens": num_tokens, "truncated_tokens": dropped,
                "truncation": {"policy": "middle", "max_tokens": max_length},
                "tokenizer": name, "source": os.path.basename(os.fspath(path)), "line": number}
        if e:
            meta["length_bucket"] = longbench_e_bucket(row["length"])
        records.append(Record(
            id=f"{'longbench_e' if e else 'longbench'}/{ds}/{row['_id']}",
            task=f"{'longbench_e' if e else 'longbench'}/{ds}", context=row["context"],
            question=row["input"], prompt=prompt, answers=answers,
            all_classes=tuple(classes) if classes else None, length=num_tokens - dropped,
            max_new_tokens=DATASET2MAXLEN[ds], metric=DATASET2METRIC[ds], meta=meta))
    return records


def v2_prompt(row: dict) -> str:
    """LongBench v2's 0-shot prompt for one sample (pred.py's replacements, fields stripped)."""
    return (V2_0SHOT.replace("$DOC$", row["context"].strip())
            .replace("$Q$", row["question"].strip())
            .replace("$C_A$", row["choice_A"].strip()).replace("$C_B$", row["choice_B"].strip())
            .replace("$C_C$", row["choice_C"].strip()).replace("$C_D$", row["choice_D"].strip()))


def read_longbench_v2(path, *, tokenizer, max_length: int | None = None) -> list[Record]:
    """Records of a LongBench v2 JSONL file (0-shot prompt, answer letter 'A'..'D')."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length}; expected None or an int >= 2")
    records, name = [], tokenizer_name(tokenizer)
    for number, row in read_jsonl(path, required=V2_FIELDS):
        if row["answer"] not in ("A", "B", "C", "D"):
            raise ValueError(f"{os.fspath(path)}, line {number}: answer={row['answer']!r}; "
                             f"expected one of 'A', 'B', 'C', 'D'")
        for key in ("difficulty", "length"):
            allowed = ("easy", "hard") if key == "difficulty" else ("short", "medium", "long")
            if row[key] not in allowed:
                raise ValueError(f"{os.fspath(path)}, line {number}: {key}={row[key]!r}; "
                                 f"expected one of {list(allowed)}")
        prompt, num_tokens, dropped = _truncate(tokenizer, v2_prompt(row), max_length, 2)
        records.append(Record(
            id=f"longbench_v2/{row['_id']}", task="longbench_v2", context=row["context"],
            question=row["question"], prompt=prompt, answers=(row["answer"],),
            all_classes=("A", "B", "C", "D"), length=num_tokens - dropped,
            max_new_tokens=V2_MAX_NEW_TOKENS, metric="extract_choice",
            meta={"_id": row["_id"], "domain": row["domain"], "sub_domain": row["sub_domain"],
                  "difficulty": row["difficulty"], "length_class": row["length"],
                  "choices": [row[f"choice_{c}"] for c in "ABCD"], "num_tokens": num_tokens,
                  "truncated_tokens": dropped,
                  "truncation": {"policy": "middle", "max_tokens": max_length},
                  "tokenizer": name, "source": os.path.basename(os.fspath(path)),
                  "line": number}))
    return records
