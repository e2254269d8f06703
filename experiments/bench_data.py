"""Input pipeline throughput: bucketed evaluation batches from lcm.data's Grain pipeline.

Measures, side by side in one process on the same records:

* `index`: generating every record once and building the stored length index (records/s);
* `filter_peer`: bucketing the usual way, one `.filter()` pass over the records per bucket (each
  pass regenerates and re-tokenizes every record), in-process;
* `plan_inproc` / `plan_workers`: lcm's plan from the stored length index, batches encoded and
  padded in-process and with `mp_prefetch` over `workers` worker processes;
  `regenerate=True` re-derives each record from (seed, index) inside the batch (the pure path),
  False reads records materialized once (a `MapDataset.source` over a list).

Each path is read `passes` times from a fresh iterator, the fastest pass kept, and timed end to
end: iterator creation, worker start-up (spawned workers import lcm and jax) and every batch, so
records/s is what an evaluation of this size sees; the time to the first batch is reported
apart. (Rates "after a warm-up" mislead here: Grain's in-process iterator prefetches on threads,
so batches read during the warm-up are finished in the background.) Rows give records/s, prompt
tokens/s, padded tokens/s, the padding share, and each path's records/s relative to
`filter_peer`.
"""

from __future__ import annotations

import os
import sys
import time

import grain
import numpy as np
from absl import flags, logging

from experiments.workdir import write_summary
from lcm.data import (ByteTokenizer, batch_dataset, length_index, plan_batches,
                      synthetic_dataset)
from lcm.data.pipeline import encode_batch


def _tokenizer(name):
    if name == "bytes":
        return ByteTokenizer()
    if name == "smollm2":
        from lcm.io import gguf
        path = gguf.smollm2_path()
        return gguf._tokenizer(gguf._metadata(gguf._open(path)), path)
    raise ValueError(f"config.tokenizer={name!r}; expected 'bytes' or 'smollm2'")


def _records(config, tokenizer):
    parts = [synthetic_dataset(task, lengths=tuple(config.lengths),
                               num_samples=config.num_samples, seed=config.seed,
                               tokenizer=tokenizer) for task in config.tasks]
    return grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]


def _drain(name, make_iterator, passes: int):
    """A row: the fastest of `passes` fresh reads, each timed end to end (iterator creation,
    worker start-up and every batch) with the time to its first batch reported apart."""
    best = None
    for _ in range(passes):
        start = time.perf_counter()
        first = None
        records = prompt = padded = 0
        for batch in make_iterator():
            if first is None:
                first = time.perf_counter() - start
            records += int(batch["valid"].sum())
            prompt += int(batch["lengths"].sum())
            padded += int(batch["tokens"].size)
        row = _row(name, time.perf_counter() - start, records, prompt, padded, first)
        if best is None or row["records_per_s"] > best["records_per_s"]:
            best = row
    return best


def _row(name, seconds, records, prompt, padded, first=None):
    seconds = max(seconds, 1e-9)
    return {"path": name, "first_batch_s": None if first is None else round(first, 3),
            "seconds": round(seconds, 3), "records": records, "prompt_tokens": prompt,
            "records_per_s": round(records / seconds, 1),
            "prompt_tokens_per_s": round(prompt / seconds), "padded_tokens_per_s":
            round(padded / seconds), "pad_share": round(1 - prompt / padded, 3) if padded else 0}


def run(config, workdir: str) -> dict:
    tokenizer = _tokenizer(config.tokenizer)
    buckets = tuple(config.buckets)
    records = _records(config, tokenizer)
    records[0]  # warm the shared caches (word lists, essay) outside the timed passes
    rows = []

    start = time.perf_counter()
    index = length_index(records, tokenizer)
    seconds = time.perf_counter() - start
    rows.append(_row("index", seconds, len(index.ids), int(index.num_tokens.sum()),
                     int(index.num_tokens.sum())))
    plan = plan_batches(index, buckets=buckets, tokens_per_batch=config.tokens_per_batch)
    materialized = grain.MapDataset.source(list(records))

    # Peer: one filter pass per bucket, each regenerating and re-tokenizing every record.
    edges = np.asarray(buckets)

    def filter_batches():
        for b, bucket in enumerate(buckets):
            def in_bucket(r, b=b):
                return int(np.searchsorted(edges, len(tokenizer.encode(r.prompt)))) == b
            rows_per_batch = max(1, config.tokens_per_batch // bucket)
            chunk = []
            for record in records.filter(in_bucket):
                chunk.append(record)
                if len(chunk) == rows_per_batch:
                    yield encode_batch(chunk, tokenizer, bucket=bucket, max_new_tokens=0)
                    chunk = []
            if chunk:
                yield encode_batch(chunk + [None] * (rows_per_batch - len(chunk)), tokenizer,
                                   bucket=bucket, max_new_tokens=0)

    if not flags.FLAGS.is_parsed():  # mp_prefetch reads absl flags (outside absl.app.run)
        flags.FLAGS(sys.argv[:1])
    peer = _drain("filter_peer", filter_batches, config.passes)
    rows.append(peer)

    for regenerate in (True, False):
        source = records if regenerate else materialized
        batches = batch_dataset(source, plan, tokenizer, process_index=0, process_count=1)
        suffix = "regenerate" if regenerate else "materialized"
        rows.append(_drain(f"plan_inproc_{suffix}", batches.to_iter_dataset,
                           config.passes))
        options = grain.MultiprocessingOptions(num_workers=config.workers)
        rows.append(_drain(f"plan_workers{config.workers}_{suffix}",
                           lambda: batches.to_iter_dataset().mp_prefetch(options),
                           config.passes))

    for row in rows:
        row["vs_filter_peer"] = round(row["records_per_s"] / peer["records_per_s"], 2)
        logging.info("%s", row)
    header = ["path", "first_batch_s", "records", "seconds", "records_per_s", "prompt_tokens_per_s",
              "padded_tokens_per_s", "pad_share", "vs_filter_peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    summary = {"rows": rows, "tasks": list(config.tasks), "lengths": list(config.lengths),
               "buckets": list(buckets), "tokens_per_batch": config.tokens_per_batch,
               "num_batches": len(plan), "tokenizer": config.tokenizer,
               "workers": config.workers, "passes": config.passes,
               "cpu_count": os.cpu_count()}
    return write_summary(workdir, summary, markdown=table)
