"""Benchmark metrics, ported exactly, under the benchmarks' own names and call signatures.

- RULER (`scripts/eval/synthetic/constants.py`, `evaluate.py`): `string_match_all`,
  `string_match_part`, `postprocess_pred`. `string_match_part` is RULER's any-match (1 if any
  reference is in the prediction), not lm-evaluation-harness's variant, which scores the fraction
  of references matched and gives 50 where RULER gives 100 on a two-alias answer.
- LongBench v1 (`LongBench/metrics.py`, `eval.py`): `qa_f1_score`, `qa_f1_zh_score`,
  `rouge_score`, `rouge_zh_score`, `classification_score`, `retrieval_score`,
  `retrieval_zh_score`, `count_score`, `code_sim_score`, and the dataset scorers
  `longbench_score` (0-100, first line only for trec/triviaqa/samsum/lsht, max over answers) and
  `longbench_e_score` (LongBench-E's 0-4k / 4-8k / 8k+ buckets).
- LongBench v2 (`pred.py`, `result.py`): `extract_choice` (its `extract_answer`) and
  `longbench_v2_table` (Overall / Easy / Hard / Short / Medium / Long).
- `exact_match` (passkey, ListOps); InfiniteBench's `first_int_match` (passkey, number_string)
  and `kv_retrieval_match`.
- `wilson_interval`: the Wilson score interval of a success rate (how far a cell's accuracy
  over n samples can be trusted).

Parity: tests/fixtures/metrics/ holds the benchmarks' own outputs on tricky pairs (empty,
Chinese, several answers, punctuation, numbers); the tests require exact equality. Dependencies:
`jieba` (the same segmenter and dictionary LongBench uses) and `rapidfuzz` for fuzzywuzzy's
`fuzz.ratio` with python-Levenshtein (the indel ratio; fuzzywuzzy's difflib fallback differs on
some strings). ROUGE-L is lcm's own port of the PyPI `rouge` package (`lcm.eval._rouge`).

Where lcm raises instead of crashing like the original: a ground truth with no paragraph number
(`retrieval_score`), classification without `all_classes`, empty inputs to the dataset scorers.
An empty LongBench-E bucket is None (LongBench writes NaN).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from lcm.eval._rouge import RECON_DEPTH_LIMIT, rouge_l_f

# ------------------------------------------------------------------------------------------ RULER


def postprocess_pred(predict_str: str) -> str:
    """RULER's cleanup before scoring: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", predict_str.strip()).strip()


def _check_lists(preds, refs):
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"preds ({len(preds)}) and refs ({len(refs)}) must be non-empty lists of "
                         f"the same length")
    if any(len(ref) == 0 for ref in refs):
        raise ValueError("every refs[i] needs at least one reference string")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER: mean over samples of the fraction of references found (case-insensitive substring),
    x100, rounded to 2 decimals."""
    _check_lists(preds, refs)
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER: mean over samples of 1 if any reference is found (case-insensitive substring),
    x100, rounded to 2 decimals."""
    _check_lists(preds, refs)
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref])
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


# ------------------------------------------------------------------------------------ LongBench v1

_ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛"
                   "｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰"
                   "〾〿–—‘’‛“”„‟…‧﹏.")
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCTUATION)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower, drop punctuation, drop articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def normalize_zh_answer(s: str) -> str:
    """Lower, drop English and Chinese punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in s.lower() if ch not in _ALL_PUNCT).split())


def _jieba_cut(text: str) -> list[str]:
    import jieba  # imported on first Chinese metric: it loads a 5 MB dictionary

    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


def _f1(prediction: list[str], ground_truth: list[str]) -> float:
    num_same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction)
    recall = 1.0 * num_same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token F1 after SQuAD normalisation."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token F1 over jieba words, each normalised, empty ones dropped."""
    def tokens(text):
        return [t for t in (normalize_zh_answer(w) for w in _jieba_cut(text)) if len(t) > 0]
    return _f1(tokens(prediction), tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F of the PyPI `rouge` package (see `lcm.eval._rouge`); 0.0 where it fails."""
    return rouge_l_f(prediction, ground_truth, depth_limit=RECON_DEPTH_LIMIT)


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F over jieba words joined by spaces."""
    return rouge_l_f(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)),
                     depth_limit=RECON_DEPTH_LIMIT - 1)


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    right = sum(1 for number in numbers if number == target)
    return 0.0 if len(numbers) == 0 else right / len(numbers)


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Share of the numbers in the prediction that equal the ground truth."""
    return float(_number_share(prediction, str(ground_truth)))


def _paragraph_id(pattern: str, ground_truth: str) -> str:
    matches = re.findall(pattern, ground_truth)
    if not matches:
        raise ValueError(f"ground_truth={ground_truth!r} has no paragraph number matching "
                         f"{pattern!r}")
    return matches[0]


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Share of the numbers in the prediction that equal N of the ground truth's 'Paragraph N'."""
    return float(_number_share(prediction, _paragraph_id(r"Paragraph (\d+)", ground_truth)))


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """As `retrieval_score`, for '段落N'."""
    return float(_number_share(prediction, _paragraph_id(r"段落(\d+)", ground_truth)))


def _fuzz_ratio(s1: str, s2: str) -> int:
    # fuzzywuzzy 0.18 `fuzz.ratio` with python-Levenshtein: equal strings 100 (checked before the
    # empty check), an empty one 0, else int(round(100 * indel similarity)).
    from rapidfuzz import fuzz

    if s1 == s2:
        return 100
    if len(s1) == 0 or len(s2) == 0:
        return 0
    return int(round(fuzz.ratio(s1, s2)))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """fuzz.ratio / 100 between the ground truth and the prediction's first line that holds no
    backtick, '#' or '//' ("" if none)."""
    first = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first = line
            break
    return _fuzz_ratio(first, ground_truth) / 100


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """1 / (number of classes named in the prediction) if the ground truth is one of them.

    Classes that are substrings of the ground truth are dropped from the matches, by removing
    from the list being iterated as LongBench does: the match right after a dropped one is never
    checked. Scores depend on that, so it is kept.
    """
    all_classes = kwargs.get("all_classes")
    if all_classes is None:
        raise ValueError("classification_score needs all_classes=[...] (the dataset's classes)")
    matched = [name for name in all_classes if name in prediction]
    for term in matched:
        if term in ground_truth and term != ground_truth:
            matched.remove(term)
    return 1.0 / len(matched) if ground_truth in matched else 0.0


DATASET2METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score,
    "musique": qa_f1_score, "dureader": rouge_zh_score, "gov_report": rouge_score,
    "qmsum": rouge_score, "multi_news": rouge_score, "vcsum": rouge_zh_score,
    "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score,
    "passage_count": count_score, "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}
# eval.py scores only the first line of the prediction for these (few-shot answers run on).
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")


def _check_dataset(dataset):
    if dataset not in DATASET2METRIC:
        raise ValueError(f"dataset={dataset!r}; expected one of {sorted(DATASET2METRIC)}")


def longbench_sample_score(dataset: str, prediction: str, answers: Sequence[str],
                           all_classes: Sequence[str] | None = None) -> float:
    """One sample as eval.py scores it: the first line for some datasets, max over answers."""
    _check_dataset(dataset)
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for ground_truth in answers:
        score = max(score, DATASET2METRIC[dataset](prediction, ground_truth,
                                                   all_classes=all_classes))
    return score


def longbench_score(dataset: str, predictions: Sequence[str],
                    answers: Sequence[Sequence[str]], all_classes) -> float:
    """LongBench's `scorer`: mean sample score x100, rounded to 2 decimals."""
    _check_dataset(dataset)
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"predictions ({len(predictions)}) and answers ({len(answers)}) must be "
                         f"non-empty and of the same length")
    total = 0.0
    for prediction, ground_truths in zip(predictions, answers):
        total += longbench_sample_score(dataset, prediction, ground_truths, all_classes)
    return round(100 * total / len(predictions), 2)


LONGBENCH_E_BUCKETS = ("0-4k", "4-8k", "8k+")


def longbench_e_score(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]],
                      lengths: Sequence[int], all_classes) -> dict[str, float | None]:
    """LongBench's `scorer_e`: per length bucket (<4000, <8000, else), mean x100, rounded.
    An empty bucket is None (LongBench: NaN)."""
    _check_dataset(dataset)
    if not len(predictions) == len(answers) == len(lengths):
        raise ValueError(f"predictions ({len(predictions)}), answers ({len(answers)}) and "
                         f"lengths ({len(lengths)}) must have the same length")
    scores: dict[str, list[float]] = {k: [] for k in LONGBENCH_E_BUCKETS}
    for prediction, ground_truths, length in zip(predictions, answers, lengths):
        bucket = "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
        scores[bucket].append(longbench_sample_score(dataset, prediction, ground_truths,
                                                     all_classes))
    # np.mean (pairwise summation) and numpy's round, as eval.py.
    return {k: round(100 * np.mean(v), 2).item() if v else None for k, v in scores.items()}


# ------------------------------------------------------------------------------------ LongBench v2


def extract_choice(response: str) -> str | None:
    """LongBench v2's `extract_answer`: 'A'..'D' from 'The correct answer is (X)' or '... is X'
    (asterisks removed first; case-sensitive), else None (scored wrong)."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response)
    if match is None:
        match = re.search(r"The correct answer is ([A-D])", response)
    return None if match is None else match.group(1)


LONGBENCH_V2_COLUMNS = ("Overall", "Easy", "Hard", "Short", "Medium", "Long")


def longbench_v2_table(results: Iterable[Mapping]) -> dict[str, float | None]:
    """LongBench v2's `result.py` row: accuracy in percent (1 decimal) overall, by difficulty
    ('easy', else hard) and by length ('short', 'medium', else long). Each result needs 'judge'
    (bool), 'difficulty' and 'length'. An empty group is None (result.py divides by zero)."""
    groups = {name: [0, 0] for name in LONGBENCH_V2_COLUMNS}
    for item in results:
        acc = int(item["judge"])
        names = ["Overall", "Easy" if item["difficulty"] == "easy" else "Hard",
                 {"short": "Short", "medium": "Medium"}.get(item["length"], "Long")]
        for name in names:
            groups[name][0] += 1
            groups[name][1] += acc
    return {name: round(100 * acc / n, 1) if n else None for name, (n, acc) in groups.items()}


# ------------------------------------------------------------------------------------ exact match


def exact_match(prediction: str, ground_truth: str, **kwargs) -> float:
    """1.0 if the prediction's first word (trailing `.,;:!?` removed) is the ground truth.

    Landmark Attention and LongLoRA decode exactly as many tokens as the answer has and compare
    stripped strings; with a longer generation budget that is the first word of the prediction.
    """
    words = prediction.split()
    first = words[0].rstrip(".,;:!?") if words else ""
    return 1.0 if first == ground_truth.strip() else 0.0


def first_int_match(prediction: str, ground_truth: str, **kwargs) -> float:
    """InfiniteBench's passkey / number_string rule (`get_score_one_passkey`): the first run of
    ASCII digits in the prediction equals the answer."""
    found = re.search(r"[0-9]+", prediction)
    return 1.0 if (found.group(0) if found else "") == ground_truth else 0.0


def kv_retrieval_match(prediction: str, ground_truth: str, **kwargs) -> float:
    """InfiniteBench's `get_score_one_kv_retrieval`: the answer is one of the prediction's words
    once newlines, quotes, braces and `:.,?!` are spaces."""
    for c in "\n:\"'.,?!{}":
        prediction = prediction.replace(c, " ")
    return 1.0 if ground_truth in prediction.split() else 0.0


# ------------------------------------------------------------------------------------ intervals


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) of a binomial proportion, as fractions in [0, 1].

    With p = successes / n and z the standard normal quantile at (1 + confidence) / 2 (1.96 for
    0.95), the bounds are the two p' solving (p - p')^2 = z^2 p' (1 - p') / n:

        (p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at 0 or n
    successes: 0 of 15 gives (0, 0.204), 15 of 15 gives (0.796, 1).

    Args:
      successes: int in [0, n], the samples counted as correct.
      n: int >= 1, the samples. n = 0 has no interval and is a ValueError (not (0, 1)), so a
        table cannot show an interval for a cell with no sample.
      confidence: float in (0, 1).

    Returns:
      (low, high), floats with 0 <= low <= successes / n <= high <= 1.
    """
    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"wilson_interval: {name}={value!r}; expected an int")
    if n < 1:
        raise ValueError(f"wilson_interval: n={n}; expected n >= 1 (no samples, no interval)")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes={successes}; expected 0 <= successes <= "
                         f"n={n}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (
            0 < confidence < 1):
        raise ValueError(f"wilson_interval: confidence={confidence!r}; expected a float in "
                         f"(0, 1)")
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At 0 and n successes the bound is exactly 0 or 1 (the formula leaves rounding error).
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high
