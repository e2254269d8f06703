"""Evaluation: benchmark metrics ported exactly (`lcm.eval.metrics`), the resumable evaluation
loop (`evaluate`, several cache policies from one prefill per batch, batches from `lcm.data`'s
Grain pipeline, optionally split over a mesh), results files, tables and heatmaps
(`write_reports`), `answer`: text in, answer text out, compressing the context only and
appending the question (kvpress's protocol, `lcm.eval.protocol`), and `loglikelihood` /
`perplexity` of documents longer than one forward fits (`lcm.eval.likelihood`)."""

from lcm.eval import metrics
from lcm.eval.generation import (default_generate_fn, generate_from_cache, greedy_generate,
                                 question_generate, shared_prefill_generate)
from lcm.eval.likelihood import loglikelihood, perplexity
from lcm.eval.loop import EvalOptions, evaluate, load_records, max_context_length
from lcm.eval.protocol import answer, answer_ids, encode_context_question
from lcm.eval.results import read_results, summarize, write_reports
from lcm.eval.scoring import SAMPLE_METRICS, aggregate, score_sample

__all__ = ["metrics", "evaluate", "EvalOptions", "load_records", "max_context_length",
           "greedy_generate", "default_generate_fn", "shared_prefill_generate",
           "generate_from_cache", "write_reports", "summarize", "read_results",
           "score_sample", "aggregate", "SAMPLE_METRICS", "question_generate", "answer",
           "answer_ids", "encode_context_question", "loglikelihood", "perplexity"]
