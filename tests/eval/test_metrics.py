"""lcm.eval.metrics against the benchmarks' own code: exact equality with fixtures made by
tests/fixtures/metrics/make_metrics_fixtures.py (LongBench, RULER, InfiniteBench sources)."""

import json
import math
import os

import pytest

from lcm.eval import metrics

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(TESTS, "fixtures", "metrics", "expected.json")
PAIR_METRICS = ["qa_f1_score", "qa_f1_zh_score", "rouge_score", "rouge_zh_score",
                "code_sim_score", "count_score", "retrieval_score", "retrieval_zh_score"]


@pytest.fixture(scope="module")
def expected():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("name", PAIR_METRICS)
def test_pair_metrics_equal_longbench(expected, name):
    fn = getattr(metrics, name)
    mismatches = []
    for row in expected["pairs"]:
        pred, gt, want = row["prediction"], row["ground_truth"], row[name]
        if want == "error":
            with pytest.raises(ValueError, match="ground_truth"):
                fn(pred, gt)
            continue
        got = fn(pred, gt)
        if got != want:
            mismatches.append((pred, gt, got, want))
    assert not mismatches, mismatches[:5]


def test_pairs_cover_the_tricky_cases(expected):
    # The fixture must exercise what makes these metrics differ from naive versions.
    rows = expected["pairs"]
    assert any(r["rouge_score"] == 0.0 and r["prediction"].strip(". ") == "" for r in rows)
    assert any(0 < r["rouge_score"] < 1 and r["prediction"].count(".") > 1 for r in rows)
    assert any(r["code_sim_score"] != r["code_sim_difflib"] for r in rows)
    assert any(r["qa_f1_zh_score"] > 0 and any("\u4e00" <= c <= "\u9fff" for c in r["prediction"])
               for r in rows)


def test_classification_score_equals_longbench(expected):
    for row in expected["classification"]:
        got = metrics.classification_score(row["prediction"], row["ground_truth"],
                                           all_classes=row["all_classes"])
        assert got == row["score"], row


def test_classification_needs_classes():
    with pytest.raises(ValueError, match="all_classes"):
        metrics.classification_score("Date", "Date")


def test_ruler_metrics_equal_ruler(expected):
    for row in expected["ruler"]:
        assert metrics.string_match_all(row["preds"], row["refs"]) == row["string_match_all"]
        assert metrics.string_match_part(row["preds"], row["refs"]) == row["string_match_part"]
    for row in expected["postprocess_pred"]:
        assert metrics.postprocess_pred(row["input"]) == row["output"]


def test_ruler_part_is_any_match_not_lm_eval_fraction():
    # lm-evaluation-harness scores the fraction of aliases matched (50 here); RULER 100.
    assert metrics.string_match_part(["Saint Petersburg"],
                                     [["St. Petersburg", "Saint Petersburg"]]) == 100.0


def test_ruler_rejects_empty_and_ragged():
    with pytest.raises(ValueError, match="same length"):
        metrics.string_match_all(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.string_match_part(["a"], [[]])


def test_longbench_score_equals_eval_py(expected):
    inputs, scores = expected["longbench"]["inputs"], expected["longbench"]["scores"]
    assert set(scores) == set(metrics.DATASET2METRIC)
    for dataset, rows in inputs.items():
        got = metrics.longbench_score(dataset, [r["pred"] for r in rows],
                                      [r["answers"] for r in rows], rows[-1]["all_classes"])
        assert got == scores[dataset], dataset


def test_longbench_e_score_equals_eval_py(expected):
    inputs, scores = expected["longbench_e"]["inputs"], expected["longbench_e"]["scores"]
    for dataset, rows in inputs.items():
        got = metrics.longbench_e_score(dataset, [r["pred"] for r in rows],
                                        [r["answers"] for r in rows],
                                        [r["length"] for r in rows], rows[-1]["all_classes"])
        for bucket, want in scores[dataset].items():
            if math.isnan(want):
                assert got[bucket] is None, (dataset, bucket)
            else:
                assert got[bucket] == want, (dataset, bucket)


def test_longbench_unknown_dataset():
    with pytest.raises(ValueError, match="dataset='qasperr'"):
        metrics.longbench_score("qasperr", ["a"], [["a"]], None)


@pytest.mark.parametrize("name", ["rouge_score", "rouge_zh_score"])
def test_rouge_recursion_limit_as_eval_py(expected, name):
    # eval.py's `rouge` recursion fails one word past the measured length; it then scores 0.
    n = expected["rouge_recursion"][name]
    fn = getattr(metrics, name)
    assert fn(" ".join(["ref"] + ["w"] * n), "ref") > 0
    assert fn(" ".join(["ref"] + ["w"] * (n + 1)), "ref") == 0.0


def test_extract_choice_equals_longbench_v2(expected):
    for row in expected["extract_answer"]:
        assert metrics.extract_choice(row["response"]) == row["choice"], row


def test_longbench_v2_table_equals_result_py(expected):
    v2 = expected["longbench_v2"]
    for name, items in v2["inputs"].items():
        assert metrics.longbench_v2_table(items) == v2["table"][name]


def test_longbench_v2_table_empty_group_is_none():
    table = metrics.longbench_v2_table([{"judge": True, "difficulty": "easy", "length": "short"}])
    assert table == {"Overall": 100.0, "Easy": 100.0, "Hard": None, "Short": 100.0,
                     "Medium": None, "Long": None}


def test_infinitebench_rules_equal_infinitebench(expected):
    for row in expected["infinitebench"]:
        assert metrics.first_int_match(row["prediction"], row["label"]) == row["passkey"], row
        assert (metrics.kv_retrieval_match(row["prediction"], row["label"])
                == row["kv_retrieval"]), row


@pytest.mark.parametrize("prediction,score", [
    (" 12345. Remember it.", 1.0), ("12345", 1.0), ("12345!", 1.0), ("123456", 0.0),
    ("The pass key is 12345", 0.0), ("", 0.0), ("\n7\n", 1.0)])
def test_exact_match(prediction, score):
    answer = "7" if "7" in prediction and "1" not in prediction else "12345"
    assert metrics.exact_match(prediction, answer) == score


# ------------------------------------------------------------------------------ Wilson interval

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def test_wilson_interval_equals_newcombes_table():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score, no correction).
    for k, n, low, high in ((81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                            (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)):
        got = metrics.wilson_interval(k, n)
        assert got == pytest.approx((low, high), abs=5e-5), (k, n)


@pytest.mark.parametrize("n", [1, 3, 15, 40])
def test_wilson_interval_closed_forms_at_the_edges(n):
    z2 = Z95 ** 2
    assert metrics.wilson_interval(0, n) == pytest.approx((0.0, z2 / (n + z2)), rel=1e-12)
    assert metrics.wilson_interval(n, n) == pytest.approx((n / (n + z2), 1.0), rel=1e-12)
    assert metrics.wilson_interval(0, n)[0] == 0.0 and metrics.wilson_interval(n, n)[1] == 1.0
    if n % 2 == 0:  # p = 1/2: centred, half-width z / (2 sqrt(n + z^2))
        half = Z95 / (2 * math.sqrt(n + z2))
        assert metrics.wilson_interval(n // 2, n) == pytest.approx((0.5 - half, 0.5 + half),
                                                                  rel=1e-12)


@pytest.mark.parametrize("k,n,confidence", [(3, 15, 0.95), (11, 15, 0.95), (7, 9, 0.9),
                                            (2, 50, 0.99)])
def test_wilson_bounds_solve_the_score_equation(k, n, confidence):
    # Each bound p' is where the score statistic |p - p'| / sqrt(p'(1-p')/n) equals z; found
    # here by bisection on that statistic (no closed form used).
    z = {0.9: 1.6448536269514722, 0.95: Z95, 0.99: 2.5758293035489004}[confidence]
    p = k / n

    def excess(q):
        return abs(p - q) - z * math.sqrt(q * (1 - q) / n)

    def root(lo, hi):  # excess(lo) and excess(hi) of opposite signs
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (excess(mid) > 0) == (excess(lo) > 0) else (lo, mid)
        return (lo + hi) / 2

    low, high = metrics.wilson_interval(k, n, confidence)
    assert low == pytest.approx(root(1e-15, p), abs=1e-12)
    assert high == pytest.approx(root(p, 1 - 1e-15), abs=1e-12)
    assert 0 < low < p < high < 1


@pytest.mark.parametrize("args,match", [
    ((0, 0), "n=0; expected n >= 1"),
    ((3, 2), "successes=3; expected 0 <= successes <= n=2"),
    ((-1, 2), "successes=-1"),
    ((1.0, 2), "successes=1.0; expected an int"),
    ((1, 2, 1.0), r"confidence=1.0; expected a float in \(0, 1\)"),
    ((1, 2, 0), "confidence=0"),
])
def test_wilson_interval_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        metrics.wilson_interval(*args)
