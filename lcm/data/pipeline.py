"""Grain pipelines from records to padded, bucketed token batches.

    records (grain.MapDataset of Record)
      -> length_index(records, tokenizer)          one pass, stored: prompt tokens per record
      -> plan_batches(index, buckets=..., ...)     static-shape batches, grouped by bucket
      -> batch_dataset(records, plan, tokenizer)   grain.MapDataset of batch dicts

Buckets come from the stored length index, so no record is read twice to find its bucket (a
`.filter()` per bucket re-reads everything once per bucket). A record longer than the largest
bucket is cut by an explicit `Truncation` policy, which results record, or rejected. Every batch
of a plan has the same rows on every process: process p of P takes rows [p * b / P, (p + 1) * b / P)
of each global batch of b rows, so all processes run the same steps in lockstep. The batch
dataset is random access, so its iterator's state is `{'next_index': i}` and resumes exactly
(checkpoint it with Orbax: `grain.checkpoint.CheckpointSave(iterator)`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import grain
import numpy as np

from lcm.checks import is_int
from lcm.data.records import Record
from lcm.data.tokenizers import pad_id, tokenizer_name

TRUNCATION_POLICIES = ("error", "middle", "left")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Truncation:
    """What happens to a prompt longer than `max_tokens` (None: the largest bucket).

    "error": raise, naming the record (the default: nothing is cut silently);
    "middle": LongBench's rule, keep the first and last int(max_tokens / 2) tokens;
    "left": keep the last max_tokens tokens (lm-evaluation-harness).
    """

    policy: str = "error"
    max_tokens: int | None = None

    def __post_init__(self):
        if self.policy not in TRUNCATION_POLICIES:
            raise ValueError(f"policy={self.policy!r}; expected one of {list(TRUNCATION_POLICIES)}")
        if self.max_tokens is not None and (not is_int(self.max_tokens)
                                            or self.max_tokens < 2):
            raise ValueError(f"max_tokens={self.max_tokens!r}; expected None or an int >= 2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def kept(self, num_tokens: int, limit: int) -> int:
        """Tokens left of a prompt of num_tokens under this policy and a cap of `limit`."""
        if num_tokens <= limit:
            return num_tokens
        if self.policy == "middle":
            return 2 * (limit // 2)
        return limit

    def apply(self, ids: np.ndarray, limit: int, *, record_id: str = "?") -> np.ndarray:
        """ids cut to at most `limit` tokens; raises under "error" when they do not fit."""
        if len(ids) <= limit:
            return ids
        if self.policy == "error":
            raise ValueError(f"record {record_id!r} has {len(ids)} prompt tokens, more than "
                             f"{limit}; use a larger bucket or Truncation(policy='middle' or "
                             f"'left')")
        if self.policy == "middle":
            half = limit // 2
            return np.concatenate([ids[:half], ids[len(ids) - half:]])
        return ids[len(ids) - limit:]


@dataclasses.dataclass(frozen=True)
class LengthIndex:
    """Prompt tokens per record of a dataset (and its ids), computed once and stored."""

    ids: tuple[str, ...]
    num_tokens: np.ndarray      # int64 [N]
    max_new_tokens: np.ndarray  # int64 [N]
    tokenizer: str

    def save(self, path) -> None:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            json.dump({"tokenizer": self.tokenizer, "ids": list(self.ids),
                       "num_tokens": self.num_tokens.tolist(),
                       "max_new_tokens": self.max_new_tokens.tolist()}, f)
        os.replace(tmp, path)  # atomic: a killed run leaves the old index or the new one

    @classmethod
    def load(cls, path) -> LengthIndex:
        try:
            with open(path) as f:
                d = json.load(f)
            index = cls(tuple(d["ids"]), np.asarray(d["num_tokens"], np.int64),
                        np.asarray(d["max_new_tokens"], np.int64), d["tokenizer"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"length index {os.fspath(path)!r} is missing or malformed ({e}); "
                             f"delete it to recompute") from e
        if not len(index.ids) == len(index.num_tokens) == len(index.max_new_tokens):
            raise ValueError(f"length index {os.fspath(path)!r}: ids, num_tokens and "
                             f"max_new_tokens differ in length; delete it to recompute")
        return index


def length_index(records: grain.MapDataset, tokenizer, *, path=None) -> LengthIndex:
    """Prompt token counts of every record, read from `path` when it holds the index of these
    records for this tokenizer, else computed (one pass) and, with `path`, stored."""
    name = tokenizer_name(tokenizer)
    if path is not None and os.path.exists(path):
        index = LengthIndex.load(path)
        if index.tokenizer == name and len(index.ids) == len(records) and (
                not len(records) or index.ids[0] == records[0].id):
            return index
    ids, num_tokens, max_new = [], [], []
    for record in records:
        ids.append(record.id)
        # Generators record the count they fitted with; others are tokenized here.
        known = record.meta.get("num_tokens") if record.meta.get("tokenizer") == name else None
        num_tokens.append(known if known is not None else len(tokenizer.encode(record.prompt)))
        max_new.append(record.max_new_tokens)
    index = LengthIndex(tuple(ids), np.asarray(num_tokens, np.int64),
                        np.asarray(max_new, np.int64), name)
    if path is not None:
        index.save(path)
    return index


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """One global batch: its bucket (padded prompt length), generation budget and record
    indices (-1 marks a padding row)."""

    bucket: int
    max_new_tokens: int
    indices: tuple[int, ...]


def plan_batches(index: LengthIndex, *, buckets: Sequence[int], batch_size: int | None = None,
                 tokens_per_batch: int | None = None, truncation: Truncation = Truncation(),
                 process_count: int = 1) -> list[BatchSpec]:
    """Static-shape batches: each record goes to the smallest bucket >= its (truncated) prompt
    length; records of one (bucket, max_new_tokens) group fill batches in index order.

    Give `batch_size` (rows per global batch) or `tokens_per_batch` (rows = tokens_per_batch //
    bucket, a constant token budget per step); rows are rounded down to a multiple of
    `process_count` (at least process_count). The last batch of a group is padded with -1 rows.
    """
    buckets = sorted(set(buckets))
    if not buckets or any(not is_int(b) or b < 1 for b in buckets):
        raise ValueError(f"buckets={buckets!r}; expected a non-empty sequence of ints >= 1")
    if (batch_size is None) == (tokens_per_batch is None):
        raise ValueError(f"batch_size={batch_size!r}, tokens_per_batch={tokens_per_batch!r}; "
                         f"expected exactly one of them")
    if process_count < 1:
        raise ValueError(f"process_count={process_count}; expected >= 1")
    limit = truncation.max_tokens or buckets[-1]
    if limit > buckets[-1]:
        raise ValueError(f"truncation.max_tokens={limit} is larger than the largest bucket "
                         f"{buckets[-1]}; add a bucket of at least {limit}")
    groups: dict[tuple[int, int], list[int]] = {}
    edges = np.asarray(buckets)
    for i, (n, new) in enumerate(zip(index.num_tokens.tolist(), index.max_new_tokens.tolist())):
        if n > limit and truncation.policy == "error":
            raise ValueError(f"record {index.ids[i]!r} has {n} prompt tokens, more than {limit}; "
                             f"use a larger bucket or Truncation(policy='middle' or 'left')")
        kept = truncation.kept(n, limit)
        bucket = int(edges[np.searchsorted(edges, kept)])
        groups.setdefault((bucket, new), []).append(i)
    plan = []
    for (bucket, new), members in sorted(groups.items()):
        rows = batch_size if batch_size is not None else tokens_per_batch // bucket
        rows = max(process_count, rows - rows % process_count)
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
            plan.append(BatchSpec(bucket, new, tuple(chunk) + (-1,) * (rows - len(chunk))))
    return plan


def encode_batch(records: Sequence[Record | None], tokenizer, *, bucket: int,
                 max_new_tokens: int, truncation: Truncation = Truncation(),
                 pad_side: str = "right") -> dict:
    """Records (None for padding rows) -> a batch dict of numpy arrays:

    tokens int32 [B, bucket] (pad id outside a row's prompt), lengths int32 [B] (prompt tokens
    kept), truncated int32 [B] (tokens cut), valid bool [B], plus `records` (the Record objects),
    `bucket`, `max_new_tokens`, `pad_side`.
    """
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side={pad_side!r}; expected 'right' or 'left'")
    limit = min(truncation.max_tokens or bucket, bucket)
    rows = len(records)
    tokens = np.full((rows, bucket), pad_id(tokenizer), np.int32)
    lengths = np.zeros(rows, np.int32)
    truncated = np.zeros(rows, np.int32)
    for r, record in enumerate(records):
        if record is None:
            continue
        ids = np.asarray(tokenizer.encode(record.prompt), np.int32)
        kept = truncation.apply(ids, limit, record_id=record.id)
        lengths[r], truncated[r] = len(kept), len(ids) - len(kept)
        if pad_side == "right":
            tokens[r, :len(kept)] = kept
        else:
            tokens[r, bucket - len(kept):] = kept
    return {"tokens": tokens, "lengths": lengths, "truncated": truncated,
            "valid": np.array([r is not None for r in records]), "records": list(records),
            "bucket": bucket, "max_new_tokens": max_new_tokens, "pad_side": pad_side}


def processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process index, process count), each defaulting to JAX's; raises unless 0 <= index <
    count."""
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}; expected 0 <= index < "
                         f"process_count={process_count}")
    return process_index, process_count


def batch_dataset(records: grain.MapDataset, plan: Sequence[BatchSpec], tokenizer, *,
                  truncation: Truncation = Truncation(), pad_side: str = "right",
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
    """A grain.MapDataset whose element k is this process's rows of global batch plan[k]
    (an `encode_batch` dict). Process index and count default to JAX's."""
    process_index, process_count = processes(process_index, process_count)
    plan = list(plan)
    for spec in plan:
        if len(spec.indices) % process_count:
            raise ValueError(f"a batch of {len(spec.indices)} rows cannot be split over "
                             f"process_count={process_count}; plan with process_count="
                             f"{process_count}")

    def element(k):
        spec = plan[k]
        share = len(spec.indices) // process_count
        mine = spec.indices[process_index * share:(process_index + 1) * share]
        batch = encode_batch([records[i] if i >= 0 else None for i in mine], tokenizer,
                             bucket=spec.bucket, max_new_tokens=spec.max_new_tokens,
                             truncation=truncation, pad_side=pad_side)
        batch["indices"] = np.asarray(mine, np.int64)
        batch["batch_index"] = k
        return batch

    return grain.MapDataset.range(len(plan)).map(element)
