"""The evaluation loop: records in, per-sample JSONL, summary, tables and heatmaps out.

    summary = evaluate(params, cfg, records, tokenizer, workdir)

Each record's `prompt` is tokenized as is (generators build it from the benchmark's template and
fit it to the token budget) and checked against the model's usable length; prompts are grouped
into buckets of equal padded length and equal generation budget (`record.max_new_tokens`, the
benchmark's own), so each bucket compiles once with static shapes. Every batch goes through
`generate_fn` (default `lcm.cache.generate`, see `lcm.eval.generation`) with the given cache
`policy`; predictions are decoded, scored (`lcm.eval.scoring`) and appended to
`workdir/results.jsonl` in one write per batch. With `resume=True` finished (run, id) pairs are
skipped, so an interrupted run continues where it stopped and ends with the same results file.
Several runs (e.g. cache policies) can share a workdir under different `EvalOptions.run` names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax.numpy as jnp
import numpy as np

from lcm.config import ModelConfig
from lcm.data import Record
from lcm.eval.generation import default_generate_fn, trim_generation
from lcm.eval.results import RESULTS_FILE, append_lines, read_results, write_reports
from lcm.eval.scoring import check_metric, score_sample

TRUNCATIONS = ("error", "middle", "left")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """How `evaluate` batches, checks and names its work.

    run: this configuration's name in the results (one workdir can hold several).
    batch_size: most rows per batch; batch_tokens: also cap rows * padded length (None: no cap).
    pad_multiple: prompts are right-padded to a multiple of this (fewer distinct shapes).
    truncation: a prompt whose tokens + generation budget exceed the usable length raises
      ("error"), or keeps its first and last halves (LongBench's "middle"), or its end ("left").
    max_length: the usable length (prompt + generation); None derives it from cfg
      (`max_context_length`). Setting it above that is explicit consent to extrapolate.
    stop_at_eos: stop a row at the tokenizer's EOS; stop_tokens: more stop ids.
    """

    run: str = "eval"
    batch_size: int = 1
    batch_tokens: int | None = None
    pad_multiple: int = 256
    truncation: str = "error"
    max_length: int | None = None
    stop_at_eos: bool = True
    stop_tokens: tuple[int, ...] = ()
    progress: bool = True
    heatmaps: bool = True

    def __post_init__(self):
        if not isinstance(self.run, str) or not self.run or "/" in self.run:
            raise ValueError(f"EvalOptions.run={self.run!r}; expected a non-empty name without "
                             f"'/'")
        for name in ("batch_size", "pad_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalOptions.{name}={value!r}; expected an int >= 1")
        for name in ("batch_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"EvalOptions.{name}={value!r}; expected None or an int >= 1")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"EvalOptions.truncation={self.truncation!r}; expected one of "
                             f"{list(TRUNCATIONS)}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


def max_context_length(cfg: ModelConfig) -> int | None:
    """Tokens (prompt + generation) the model is configured to handle; None for no bound.

    RoPE: `max_position_embeddings` (raise it with the RoPE scaling, as transformers' configs
    do), or original_max_position_embeddings x factor when that is larger. Self-Extend:
    (max_position_embeddings - window) * group_size + window (LongLM). Leaky ReRoPE:
    window + (max_position_embeddings - window) * leak. ReRoPE and ALiBi: no bound.
    """
    limit = cfg.max_position_embeddings
    pos = cfg.positions
    if pos.type == "self_extend":
        return (limit - pos.window) * pos.group_size + pos.window
    if pos.type == "leaky_rerope":
        return int(pos.window + (limit - pos.window) * pos.leak)
    if pos.type in ("rerope", "alibi"):
        return None
    rope = cfg.rope
    if rope.factor is not None and rope.original_max_position_embeddings is not None:
        limit = max(limit, int(rope.original_max_position_embeddings * rope.factor))
    return limit


def load_records(path: str) -> list[Record]:
    """Records from a JSONL file (`Record.to_json` lines); errors name the file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"records file {path!r} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(Record.from_json(line))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: line {number}: {e}") from None
    return records


def _fingerprint(cfg, policy, options, generate_fn) -> dict:
    fields = dataclasses.asdict(options)
    for name in ("progress", "heatmaps", "batch_size", "batch_tokens"):
        fields.pop(name)  # do not change any prediction
    return {"model": hashlib.sha256(repr(cfg).encode()).hexdigest()[:16],
            "policy": repr(policy), "options": json.loads(json.dumps(fields)),
            "generate_fn": f"{generate_fn.__module__}.{generate_fn.__qualname__}"}


def _check_run(workdir, run, fingerprint, resume, has_rows):
    path = os.path.join(workdir, "runs.json")
    runs = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            runs = json.load(f)
    if run in runs and runs[run] != fingerprint and has_rows:
        diff = sorted(k for k in fingerprint if runs[run].get(k) != fingerprint[k])
        raise ValueError(f"{workdir}: run {run!r} was made with a different setup (differs in "
                         f"{diff}); use a new workdir or another EvalOptions.run")
    if has_rows and not resume:
        raise ValueError(f"{workdir}: results for run {run!r} exist; pass resume=True to "
                         f"continue them, or use a new workdir")
    runs[run] = fingerprint
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(runs, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _prepare(record, tokenizer, limit, options):
    ids = list(tokenizer.encode(record.prompt))
    if limit is None or len(ids) + record.max_new_tokens <= limit:
        return ids, 0
    room = limit - record.max_new_tokens
    if options.truncation == "error" or room < 2:
        raise ValueError(
            f"record {record.id!r}: {len(ids)} prompt tokens + max_new_tokens="
            f"{record.max_new_tokens} exceed the model's usable length {limit}; extend the "
            f"context (RopeConfig scaling with a larger max_position_embeddings, or "
            f"PositionConfig self_extend), or set EvalOptions(truncation='middle'|'left') or "
            f"max_length=")
    dropped = len(ids) - room
    if options.truncation == "left":
        return ids[-room:], dropped
    half = room // 2
    return ids[:half] + ids[len(ids) - (room - half):], dropped


def evaluate(params, cfg: ModelConfig, records, tokenizer, workdir: str, *,
             options: EvalOptions = EvalOptions(), policy=None, generate_fn=None,
             resume: bool = True) -> dict:
    """Generates, scores and records every record; returns the summary (also written).

    records: Records, any iterable of them (a list from `lcm.data` generators or `load_records`,
    a `grain.MapDataset` such as `lcm.data.synthetic_dataset(...)`). tokenizer: `encode`,
    `decode`, and optionally `eos_id` / `pad_id`. policy: a cache policy for generate_fn.
    """
    start = time.perf_counter()
    records = list(records)
    ids = set()
    for r in records:
        if not isinstance(r, Record):
            raise ValueError(f"records hold a {type(r).__name__}; expected lcm.data.Record")
        if r.id in ids:
            raise ValueError(f"record id {r.id!r} appears twice; ids must be unique")
        ids.add(r.id)
        check_metric(r.metric)
    generate_fn = default_generate_fn() if generate_fn is None else generate_fn
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULTS_FILE)
    previous = read_results(path, repair=resume)
    done = {row["id"] for row in previous if row.get("run") == options.run}
    _check_run(workdir, options.run, _fingerprint(cfg, policy, options, generate_fn), resume,
               bool(done))

    limit = options.max_length if options.max_length is not None else max_context_length(cfg)
    todo = [(r, *_prepare(r, tokenizer, limit, options)) for r in records if r.id not in done]
    stop = set(options.stop_tokens)
    if options.stop_at_eos and getattr(tokenizer, "eos_id", None) is not None:
        stop.add(int(tokenizer.eos_id))
    stop = tuple(sorted(stop))
    pad_id = int(getattr(tokenizer, "pad_id", None) or 0)

    buckets: dict[tuple[int, int], list] = {}
    for item in todo:
        padded = -(-len(item[1]) // options.pad_multiple) * options.pad_multiple
        buckets.setdefault((padded, item[0].max_new_tokens), []).append(item)

    total_tokens = sum(len(ids) + r.max_new_tokens for r, ids, _ in todo)
    bar = _progress(total_tokens, options)
    model_s, finished = 0.0, len(done)
    for (padded, budget), items in sorted(buckets.items()):
        rows_per_batch = options.batch_size
        if options.batch_tokens is not None:
            rows_per_batch = max(1, min(rows_per_batch, options.batch_tokens // padded))
        for lo in range(0, len(items), rows_per_batch):
            batch = items[lo:lo + rows_per_batch]
            prompts = np.full((rows_per_batch, padded), pad_id, np.int32)
            lengths = np.zeros((rows_per_batch,), np.int32)
            for i in range(rows_per_batch):  # missing rows repeat the first: static shapes
                _, tokens, _ = batch[i] if i < len(batch) else batch[0]
                prompts[i, :len(tokens)] = tokens
                lengths[i] = len(tokens)
            t0 = time.perf_counter()
            out, count = generate_fn(params, cfg, jnp.asarray(prompts),
                                     lengths=jnp.asarray(lengths), max_new_tokens=budget,
                                     policy=policy, stop_tokens=stop, temperature=0.0)
            out, count = np.asarray(out), np.asarray(count)
            model_s += time.perf_counter() - t0
            rows = []
            for i, (record, tokens, dropped) in enumerate(batch):
                gen = trim_generation(out[i], count[i], record.max_new_tokens, stop)
                prediction = tokenizer.decode(gen)
                rows.append({
                    "run": options.run, "id": record.id, "task": record.task,
                    "length": record.length, "depth": record.depth, "metric": record.metric,
                    "prediction": prediction, "answers": list(record.answers),
                    "score": score_sample(record.metric, prediction, record.answers,
                                          task=record.task, all_classes=record.all_classes),
                    "num_prompt_tokens": len(tokens), "num_generated": len(gen),
                    "truncated_tokens": dropped, "meta": record.meta})
            append_lines(path, rows)
            finished += len(batch)
            bar.update(sum(len(t) + r.max_new_tokens for r, t, _ in batch))
            bar.set_postfix(samples=finished, refresh=False)
    bar.close()
    total_s = time.perf_counter() - start
    # Time outside generate_fn: tokenizing, batching, decoding, scoring, writing (not reports).
    timing = {"model_s": round(model_s, 3), "loop_s": round(total_s, 3),
              "outside_model_share": round(1 - model_s / total_s, 4) if total_s > 0 else 0.0,
              "samples_this_session": len(todo)}
    return write_reports(workdir, read_results(path), heatmaps=options.heatmaps,
                         extra={"truncation": options.truncation, "max_length": limit,
                                "timing": timing})


def _progress(total, options):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, disable=not options.progress,
                desc=f"eval[{options.run}]", smoothing=0.1)
