"""Scoring dispatch and aggregation (equal to the benchmarks' scorers), tables and heatmap grids."""

import csv
import io
import json
import math
import os

import pytest

from lcm.eval import metrics
from lcm.eval.results import csv_table, depth_grid, markdown_table, summarize
from lcm.eval.scoring import aggregate, score_sample

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(TESTS, "fixtures", "metrics", "expected.json")


@pytest.fixture(scope="module")
def expected():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


def test_sample_scores_aggregate_to_longbench_eval_py(expected):
    # Per-sample scores from the loop's dispatch, aggregated, equal eval.py's dataset score.
    for dataset, rows in expected["longbench"]["inputs"].items():
        metric = metrics.DATASET2METRIC[dataset].__name__
        scores = [score_sample(metric, r["pred"], r["answers"], task=f"longbench/{dataset}",
                               all_classes=r["all_classes"]) for r in rows]
        assert aggregate(metric, scores) == expected["longbench"]["scores"][dataset], dataset


def test_first_line_rule_follows_the_dataset():
    # trec scores the first line only; the same metric on another task does not.
    kw = {"all_classes": ["Number", "Date"]}
    assert score_sample("classification_score", "Date\nNumber", ["Number"],
                        task="longbench/trec", **kw) == 0.0
    assert score_sample("classification_score", "Date\nNumber", ["Number"], task="mine",
                        **kw) == 0.5


def test_sample_scores_aggregate_to_ruler(expected):
    for row in expected["ruler"]:
        for metric in ("string_match_all", "string_match_part"):
            scores = [score_sample(metric, p, r) for p, r in zip(row["preds"], row["refs"])]
            assert aggregate(metric, scores) == row[metric]


def test_unknown_metric_names_the_choices():
    with pytest.raises(ValueError, match=r"metric='f1'.*'exact_match'"):
        score_sample("f1", "a", ["a"])
    with pytest.raises(ValueError, match="answers is empty"):
        score_sample("exact_match", "a", [])


def test_extract_choice_metric():
    assert score_sample("extract_choice", "**The correct answer is (B)**", ["B"]) == 1.0
    assert score_sample("extract_choice", "the correct answer is (B)", ["B"]) == 0.0


def _rows():
    rows = []
    for run in ("full", "snapkv"):
        for task, metric in (("passkey", "exact_match"), ("niah_single_1", "string_match_all")):
            for length in (1024, 2048):
                for depth in (0.0, 0.5, 1.0):
                    hit = run == "full" or depth < 1.0 or length == 1024
                    rows.append({"run": run, "id": f"{task}/{length}/{depth}", "task": task,
                                 "length": length, "depth": depth, "metric": metric,
                                 "prediction": "42" if hit else "", "answers": ["42"],
                                 "score": 1.0 if hit else 0.0})
    return rows


def test_summary_headlines_tables_and_grid():
    rows = _rows()
    summary = summarize(rows)
    cells = {(c["run"], c["task"], c["length"]): c for c in summary["cells"]}
    assert cells[("snapkv", "passkey", 2048)]["score"] == 66.67
    assert cells[("snapkv", "passkey", 2048)]["num_empty"] == 1
    assert summary["avg_over_tasks"]["snapkv"] == {1024: 100.0, 2048: 66.67}
    assert summary["avg_over_lengths"]["snapkv"]["passkey"] == round((100 + 66.67) / 2, 2)

    md = markdown_table(summary)
    assert "| run | task | 1k | 2k | all |" in md
    assert "| snapkv | **avg** | 100.00 | 66.67 | - |" in md
    assert "unweighted mean" in md
    table = list(csv.DictReader(io.StringIO(csv_table(summary))))
    assert len(table) == len(summary["cells"]) + 4
    assert {r["task"] for r in table} == {"passkey", "niah_single_1", "avg"}

    depths, lengths, grid = depth_grid(rows, "snapkv", "passkey")
    assert depths == [0.0, 0.5, 1.0] and lengths == [1024, 2048]
    assert grid[2, 1] == 0.0 and grid[2, 0] == 100.0 and grid[0, 1] == 100.0
    depths, _, grid = depth_grid(rows, "full", "missing")
    assert depths == [] and grid.size == 0


def test_cells_carry_wilson_intervals_of_their_0_1_scores():
    rows = _rows()
    summary = summarize(rows)
    cells = {(c["run"], c["task"], c["length"]): c for c in summary["cells"]}
    cell = cells[("snapkv", "passkey", 2048)]  # 2 of 3 correct
    low, high = metrics.wilson_interval(2, 3)
    assert (cell["successes"], cell["num_samples"]) == (2, 3)
    assert (cell["ci_low"], cell["ci_high"]) == (round(100 * low, 2), round(100 * high, 2))
    assert cells[("full", "passkey", 1024)]["ci_high"] == 100.0
    md = markdown_table(summary)
    assert (f"| snapkv | passkey | 2k | 3 | 66.67 | 2 | [{round(100 * low, 2):.2f}, "
            f"{round(100 * high, 2):.2f}] |" in md)
    table = {(r["run"], r["task"], r["length"]): r
             for r in csv.DictReader(io.StringIO(csv_table(summary)))}
    assert float(table[("snapkv", "passkey", "2048")]["ci_low"]) == cell["ci_low"]
    assert table[("snapkv", "avg", "2048")]["ci_low"] == ""

    # A fractional sample score (two needles, one found) has no binomial count: no interval.
    rows[0] = dict(rows[0], metric="exact_match", score=0.5)
    rows = [r for r in rows if r["task"] == "passkey"]
    cell = {(c["run"], c["length"]): c for c in summarize(rows)["cells"]}[("full", 1024)]
    assert cell["score"] == round(100 * 2.5 / 3, 2)
    assert cell["successes"] is cell["ci_low"] is cell["ci_high"] is None
    assert "| full | passkey | 1k | 3 | 83.33 | - | - |" in markdown_table(summarize(rows))


def test_depth_grid_counts_the_samples_of_each_entry():
    rows = _rows() + [dict(_rows()[0], id="extra", score=0.0)]  # a second sample at one entry
    depths, lengths, grid, sizes = depth_grid(rows, "full", "passkey", counts=True)
    assert sizes[0, 0] == 2 and grid[0, 0] == 50.0
    assert sizes.sum() == 7 and sizes.dtype.kind == "i"


def test_summary_rejects_mixed_metrics_in_a_cell():
    rows = _rows()
    rows[0] = dict(rows[0], metric="string_match_all")
    with pytest.raises(ValueError, match="expected one per task"):
        summarize(rows)


def test_heatmap_cells_without_samples_are_nan():
    rows = [r for r in _rows() if not (r["length"] == 2048 and r["depth"] == 0.5)]
    _, _, grid = depth_grid(rows, "full", "passkey")
    assert math.isnan(grid[1, 1]) and grid[1, 0] == 100.0


def test_longbench_cells_use_buckets_and_v2_gets_its_table(expected, tmp_path):
    from lcm.eval.results import write_reports

    rows = []
    e_inputs = expected["longbench_e"]["inputs"]["trec"]
    for i, r in enumerate(e_inputs):
        bucket = "0-4k" if r["length"] < 4000 else "4-8k" if r["length"] < 8000 else "8k+"
        rows.append({"id": f"e{i}", "task": "longbench_e/trec", "length": 100 + i,
                     "metric": "classification_score", "prediction": r["pred"],
                     "answers": r["answers"], "meta": {"length_bucket": bucket},
                     "score": score_sample("classification_score", r["pred"], r["answers"],
                                           task="longbench_e/trec",
                                           all_classes=r["all_classes"])})
    for i, item in enumerate(expected["longbench_v2"]["inputs"]["model_a"]):
        rows.append({"id": f"v{i}", "task": "longbench_v2", "length": 5000 + i,
                     "metric": "extract_choice", "prediction": str(item["pred"]),
                     "answers": [item["answer"]], "score": float(item["judge"]),
                     "meta": {"difficulty": item["difficulty"], "length_class": item["length"]}})
    summary = write_reports(str(tmp_path), rows)
    cells = {(c["task"], c["length"]): c["score"] for c in summary["cells"]}
    for bucket, want in expected["longbench_e"]["scores"]["trec"].items():
        assert cells[("longbench_e/trec", bucket)] == want
    assert ("longbench_v2", "all") in cells
    assert summary["longbench_v2"]["eval"] == expected["longbench_v2"]["table"]["model_a"]
    assert "LongBench v2 (eval): Overall" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["avg_over_tasks"]["eval"]["all"]
