"""Evaluation data: the Record type, tokenizers, synthetic generators, benchmark readers, Grain
pipelines."""

from lcm.data.records import Record, record_id

__all__ = ["Record", "record_id"]
