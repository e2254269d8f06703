"""Evaluation: benchmark metrics ported exactly (`lcm.eval.metrics`), the resumable evaluation
loop, results files, tables and heatmaps."""

from lcm.eval import metrics

__all__ = ["metrics"]
