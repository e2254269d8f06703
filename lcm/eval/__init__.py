"""Evaluation: benchmark metrics ported exactly (`lcm.eval.metrics`), the resumable evaluation
loop (`evaluate`), results files, tables and heatmaps (`write_reports`)."""

from lcm.eval import metrics
from lcm.eval.generation import default_generate_fn, greedy_generate
from lcm.eval.loop import EvalOptions, evaluate, load_records, max_context_length
from lcm.eval.results import read_results, summarize, write_reports
from lcm.eval.scoring import SAMPLE_METRICS, aggregate, score_sample

__all__ = ["metrics", "evaluate", "EvalOptions", "load_records", "max_context_length",
           "greedy_generate", "default_generate_fn", "write_reports", "summarize", "read_results",
           "score_sample", "aggregate", "SAMPLE_METRICS"]
