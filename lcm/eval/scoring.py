"""Scores one record's prediction, and aggregates sample scores as each benchmark does.

`Record.metric` names a function of `lcm.eval.metrics`; `score_sample` applies it the way that
benchmark's own scorer does, giving a score in [0, 1]:

- RULER's `string_match_all` / `string_match_part`: on the prediction after RULER's
  `postprocess_pred`, over all of the record's answers (the fraction found / any found).
- LongBench's per-pair metrics (`qa_f1_score`, `rouge_score`, ...): max over answers; for a
  LongBench dataset (the task's last '/' part, e.g. 'longbench/trec' -> 'trec') eval.py's
  first-line rule applies too.
- `exact_match`, `first_int_match`, `kv_retrieval_match`: max over answers.
- `extract_choice` (LongBench v2): 1 if the extracted letter is the answer.

`aggregate(metric, scores)` turns a cell's sample scores into the benchmark's 0-100 number with
its own arithmetic (RULER: sum / n * 100; LongBench and the rest: 100 * sum / n; both rounded to
2 decimals), so a cell equals what the benchmark's script prints for the same predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

from lcm.eval import metrics as M

_PAIR_METRICS = {
    "qa_f1_score": M.qa_f1_score, "qa_f1_zh_score": M.qa_f1_zh_score,
    "rouge_score": M.rouge_score, "rouge_zh_score": M.rouge_zh_score,
    "classification_score": M.classification_score, "retrieval_score": M.retrieval_score,
    "retrieval_zh_score": M.retrieval_zh_score, "count_score": M.count_score,
    "code_sim_score": M.code_sim_score, "exact_match": M.exact_match,
    "first_int_match": M.first_int_match, "kv_retrieval_match": M.kv_retrieval_match,
}
_RULER = ("string_match_all", "string_match_part")
SAMPLE_METRICS = tuple(sorted([*_PAIR_METRICS, *_RULER, "extract_choice"]))


def check_metric(metric: str) -> None:
    if metric not in SAMPLE_METRICS:
        raise ValueError(f"metric={metric!r}; expected one of {list(SAMPLE_METRICS)} "
                         f"(functions of lcm.eval.metrics)")


def score_sample(metric: str, prediction: str, answers: Sequence[str], *, task: str = "",
                 all_classes: Sequence[str] | None = None) -> float:
    """One sample's score in [0, 1] (see the module doc)."""
    check_metric(metric)
    if not answers:
        raise ValueError(f"task={task!r}: answers is empty; every record needs an answer")
    if metric in _RULER:
        pred = M.postprocess_pred(prediction).lower()
        hits = [1.0 if r.lower() in pred else 0.0 for r in answers]
        return sum(hits) / len(hits) if metric == "string_match_all" else max(hits)
    if metric == "extract_choice":
        return 1.0 if M.extract_choice(prediction.strip()) == answers[0] else 0.0
    dataset = task.rsplit("/", 1)[-1]
    if dataset in M.DATASET2METRIC and M.DATASET2METRIC[dataset] is _PAIR_METRICS[metric]:
        return float(M.longbench_sample_score(dataset, prediction, answers, all_classes))
    fn = _PAIR_METRICS[metric]
    return float(max(fn(prediction, gt, all_classes=all_classes) for gt in answers))


def length_group(task: str, length: int, meta: dict):
    """The table column of a sample: LongBench-E's bucket ('0-4k', '4-8k', '8k+'), 'all' for
    LongBench v1/v2 (no length grid; `length` is the sample's own token count), else the
    target length."""
    if "length_bucket" in meta:
        return meta["length_bucket"]
    if task.startswith(("longbench/", "longbench_v2")):
        return "all"
    return length


def aggregate(metric: str, scores: Sequence[float], *, task: str = "") -> float:
    """A cell's 0-100 score from its sample scores, with the benchmark's arithmetic."""
    check_metric(metric)
    if not scores:
        raise ValueError(f"no scores to aggregate for metric={metric!r}")
    if task.startswith("longbench_e/"):  # scorer_e: numpy's pairwise mean and round
        import numpy as np
        return round(100 * np.mean(scores), 2).item()
    if metric in _RULER:
        return round(sum(scores) / len(scores) * 100, 2)
    total = 0.0
    for s in scores:  # LongBench's scorer adds in order
        total += s
    return round(100 * total / len(scores), 2)
