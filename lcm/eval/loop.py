"""The evaluation loop: records in, per-sample JSONL, summary, tables and heatmaps out.

    summary = evaluate(params, cfg, records, tokenizer, workdir)
    summary = evaluate(params, cfg, records, tokenizer, workdir,
                       policies={"full": None, "snapkv": SnapKV(compression_ratio=0.5)})

Each record's `prompt` is tokenized as is (generators build it from the benchmark's template and
fit it to the token budget) and checked against the model's usable length. Batches come from
`lcm.data`'s Grain pipeline (`length_index`, `plan_batches`, `batch_dataset`): prompts grouped
by padded length and generation budget (`record.max_new_tokens`, the benchmark's own), so each
group compiles once with static shapes, and cut only by an explicit `lcm.data.Truncation`. Every
batch goes through `generate_fn` (default `lcm.cache.generate`, see `lcm.eval.generation`) with
the run's cache policy, or, for several policies, through one shared prefill compressed per
policy; predictions are decoded, scored (`lcm.eval.scoring`) and appended to
`workdir/results.jsonl` in one write per batch. With `resume=True` finished (run, id) pairs are
skipped, so an interrupted run continues where it stopped and ends with the same results file.
Several runs (cache policies, settings) share a workdir under different run names.

What a cache policy compresses (`EvalOptions.compress_question`): by default kvpress's protocol,
the prompt up to the end of the record's context is prefilled and compressed and the rest (the
question, the template's closing part, the answer prefix) is appended after compression at the
positions that follow (`lcm.eval.generation.question_generate`); with compress_question=True
the whole prompt, question included, is compressed (question-aware compression). The split is
made in tokens: the prompt's tokens that `tokenizer.encode(prompt[:end of context])` also gives
are the context, the rest the question, so both protocols see the same tokens (where BPE joins
a token across the boundary, that token goes to the question). The full cache (policy None)
gives the same predictions under both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lcm.checks import check_int, is_int
from lcm.config import ModelConfig
from lcm.data import (
    LengthIndex,
    Record,
    Truncation,
    batch_dataset,
    encode_batch,
    length_index,
    plan_batches,
)
from lcm.data.pipeline import TRUNCATION_POLICIES
from lcm.data.tokenizers import pad_id
from lcm.eval.generation import (
    default_generate_fn,
    question_generate,
    shared_prefill_generate,
    shares_prefill,
    trim_generation,
)
from lcm.eval.results import RESULTS_FILE, append_lines, read_results, write_reports
from lcm.eval.scoring import check_metric, score_sample
from lcm.model import check_finite_params
from lcm.sharding.mesh import host_array

TRUNCATIONS = TRUNCATION_POLICIES


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """How `evaluate` batches, checks and names its work.

    - run: this configuration's name in the results (one workdir can hold several).
    - batch_size: most rows per batch; batch_tokens: also cap rows * padded length (None: no
      cap).
    - pad_multiple: prompts are right-padded to a multiple of this (fewer distinct shapes).
    - truncation: a prompt whose tokens + generation budget exceed the usable length raises
      ("error"), or is cut by `lcm.data.Truncation`: its first and last int(room / 2) tokens
      (LongBench's "middle") or its last room tokens ("left"), room = usable length - budget.
    - max_length: the usable length (prompt + generation); None derives it from cfg
      (`max_context_length`). Setting it above that is explicit consent to extrapolate.
    - stop_at_eos: stop a row at the tokenizer's EOS; stop_tokens: more stop ids.
    - progress: a progress bar; heatmaps: write depth x length heatmaps with the reports.
    - compress_question: False (default) follows kvpress's protocol: a cache policy compresses
      the prompt up to the end of the record's context, and the question after it is appended
      after compression; True compresses the whole prompt with the question inside it
      (question-aware). The record's context must appear in its prompt (else its question,
      whose start is then the split) when False and a run has a policy. It enters each run's
      fingerprint, so runs of the two protocols never mix in one run's results.
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
    compress_question: bool = False

    def __post_init__(self):
        if not isinstance(self.run, str) or not self.run or "/" in self.run:
            raise ValueError(f"EvalOptions.run={self.run!r}; expected a non-empty name without "
                             f"'/'")
        for name in ("batch_size", "pad_multiple"):
            value = getattr(self, name)
            check_int("EvalOptions", name, value, 1)
            object.__setattr__(self, name, int(value))
        for name in ("batch_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"EvalOptions.{name}={value!r}; expected None or an int >= 1")
            object.__setattr__(self, name, None if value is None else int(value))
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"EvalOptions.truncation={self.truncation!r}; expected one of "
                             f"{list(TRUNCATIONS)}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        if not isinstance(self.compress_question, bool):
            raise ValueError(f"EvalOptions.compress_question={self.compress_question!r}; "
                             f"expected a bool (False: kvpress's protocol, the question appended "
                             f"after compression; True: the question compressed with the "
                             f"context)")


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
        try:
            with open(path, encoding="utf-8") as f:
                runs = json.load(f)
            if not isinstance(runs, dict):
                raise ValueError(f"a JSON {type(runs).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path} is unreadable ({e}); it records each run's setup: "
                             f"restore it, or delete it to accept the results as they "
                             f"are") from None
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


def evaluate(params, cfg: ModelConfig, records, tokenizer, workdir: str, *,
             options: EvalOptions = EvalOptions(), policy=None, policies=None,
             generate_fn=None, resume: bool = True, mesh=None, data_axis: str = "data") -> dict:
    """Generates, scores and records every record; returns the summary (also written).

    records: Records, any iterable of them (a list from `lcm.data` generators or `load_records`,
    a `grain.MapDataset` such as `lcm.data.synthetic_dataset(...)`). tokenizer: `encode`,
    `decode`, and optionally `eos_id` / `pad_id`. policy: a cache policy for generate_fn, the
    run being `options.run`. policies: instead, several runs at once, {run name: policy (None
    for the full cache)}; each batch is then prefilled once and compressed per policy
    (`lcm.eval.generation.shared_prefill_generate`, the same tokens as one `lcm.cache.generate`
    per policy) unless generate_fn is given or cfg is not a RoPE model (then generate_fn, by
    default `default_generate_fn(cfg)`, runs per policy). Resume is per (run, record id):
    a record missing from some runs is generated for those runs only.

    mesh: a `jax.sharding.Mesh` whose `data_axis` splits every batch's rows (rows per batch are
    rounded down to a multiple of its size, at least one per device; params are replicated over
    the mesh unless already on it). Under several processes (`jax.distributed`) each process
    reads only its rows of each batch from the pipeline; the generated tokens are gathered, and
    process 0 alone reads and writes the workdir (what is done, the run checks, the results,
    the reports), broadcasting its answers, so the workdir need only exist on process 0's disk.
    Every process returns process 0's summary. The results file is the one an unsharded run
    with the same rows per batch writes.

    Checked before any work: params hold no NaN / inf (`lcm.model.check_finite_params`) and,
    per batch, the prompt ids lie in the vocabulary; a shared prefill that still gives NaN
    logits stops the run (FloatingPointError naming the rows) before its results are written.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    runs = _runs(options, policy, policies)
    records = list(records)
    ids = set()
    for r in records:
        if not isinstance(r, Record):
            raise ValueError(f"records hold a {type(r).__name__}; expected lcm.data.Record")
        if r.id in ids:
            raise ValueError(f"record id {r.id!r} appears twice; ids must be unique")
        ids.add(r.id)
        check_metric(r.metric)
    check_finite_params(params)  # NaN weights would decode as token 0, silently
    # One prefill for several policies; a single policy compresses inside prefill, which keeps
    # one layer's full K/V at a time instead of every layer's.
    shared = (generate_fn is None and cfg.positions.type == "rope"
              and sum(shares_prefill(p) for p in runs.values()) > 1)
    appended = not options.compress_question and any(p is not None for p in runs.values())
    if appended:
        _check_protocol(cfg, runs, generate_fn)
    generate_fn = default_generate_fn(cfg) if generate_fn is None else generate_fn

    def used_fn(policy):
        if shared and shares_prefill(policy):
            return shared_prefill_generate
        if appended and policy is not None:
            return question_generate
        return generate_fn

    path = os.path.join(workdir, RESULTS_FILE)
    fingerprints = {run: _fingerprint(cfg, run_policy, options, used_fn(run_policy))
                    for run, run_policy in runs.items()}
    # Process 0 alone reads and writes the workdir (other hosts may not share its disk); every
    # process gets its answer, or raises its error.
    done = {run: set(ids) for run, ids in _from_process_0(
        lambda: _open_workdir(workdir, path, fingerprints, resume)).items()}

    limit = options.max_length if options.max_length is not None else max_context_length(cfg)
    todo = [r for r in records if any(r.id not in done[run] for run in runs)]
    stop = set(options.stop_tokens)
    if options.stop_at_eos and getattr(tokenizer, "eos_id", None) is not None:
        stop.add(int(tokenizer.eos_id))
    stop = tuple(sorted(stop))

    shards = 1
    if mesh is not None:
        if data_axis not in mesh.shape:
            raise ValueError(f"data_axis={data_axis!r}; expected one of the mesh axes "
                             f"{list(mesh.shape)}")
        shards = mesh.shape[data_axis]
        params = _replicate(params, mesh)
    batches, total_tokens = _batches(todo, tokenizer, limit, options, shards)
    bar = _progress(total_tokens, options)
    timing = {"model_s": 0.0, "prefill_s": 0.0, "prefill_cpu_s": 0.0,
              "generate_s": dict.fromkeys(runs, 0.0), "generate_cpu_s": dict.fromkeys(runs, 0.0)}
    written = 0
    question_counts: dict[str, int] = {}
    for items, batch in batches:
        prompts, lengths = _local_rows(batch, items, tokenizer, options)
        split = None
        if appended:
            split = _split_rows(batch, items, prompts, lengths, tokenizer, options,
                                question_counts)
        if mesh is not None:
            prompts, lengths = (_to_mesh(x, mesh, data_axis) for x in (prompts, lengths))
            if split is not None:
                split = tuple(_to_mesh(x, mesh, data_axis) for x in split)
        wanted = {run: p for run, p in runs.items()
                  if any(r.id not in done[run] for r, _, _ in items if r is not None)}
        t0 = time.perf_counter()
        outputs = _generate_runs(params, cfg, prompts, lengths, batch["max_new_tokens"], wanted,
                                 stop, generate_fn if not shared else None, timing, split)
        timing["model_s"] += time.perf_counter() - t0
        rows = []
        for run, (out, count) in outputs.items():
            out, count = host_array(out), host_array(count)
            for i, (record, num_tokens, dropped) in enumerate(items):
                if record is not None and record.id not in done[run]:
                    rows.append(_row(run, record, num_tokens, dropped, out[i], count[i], stop,
                                     tokenizer))
        if jax.process_index() == 0:
            append_lines(path, rows)
        written += len(rows)
        bar.update(sum(n + r.max_new_tokens for r, n, _ in items if r is not None))
        bar.set_postfix(rows=written, refresh=False)
    bar.close()
    total_s = time.perf_counter() - start
    # Time outside generation: tokenizing, batching, decoding, scoring, writing (not reports).
    model_s = timing.pop("model_s")
    timing = {"model_s": round(model_s, 3), "loop_s": round(total_s, 3),
              "loop_cpu_s": round(time.process_time() - cpu_start, 3),
              "outside_model_share": round(1 - model_s / total_s, 4) if total_s > 0 else 0.0,
              "samples_this_session": written,
              **{k: _rounded(v) for k, v in timing.items()}}
    extra = {"truncation": options.truncation, "max_length": limit, "timing": timing}
    # Process 0 has appended every row; its summary (and files) are every process's answer.
    return _from_process_0(lambda: write_reports(workdir, read_results(path),
                                                 heatmaps=options.heatmaps, extra=extra))


def _open_workdir(workdir, path, fingerprints, resume) -> dict:
    """{run: [ids already in the results]} after checking each run's setup against runs.json
    (and recording it); creates the workdir and repairs a torn last line when resuming."""
    os.makedirs(workdir, exist_ok=True)
    previous = read_results(path, repair=resume)
    done = {run: sorted({row["id"] for row in previous if row.get("run") == run})
            for run in fingerprints}
    for run, fingerprint in fingerprints.items():
        _check_run(workdir, run, fingerprint, resume, bool(done[run]))
    return done


def _from_process_0(fn):
    """fn() run on process 0 alone, its JSON-able result given to every process. An exception
    raised there (a refused setup, an unwritable workdir) is raised on every process: the
    original on process 0, a ValueError (for a ValueError) or RuntimeError naming it elsewhere,
    so no process waits for an answer that never comes. With one process, just fn()."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils
    payload, failure = b"", None
    if jax.process_index() == 0:
        try:
            payload = json.dumps({"value": fn()}).encode()
        except Exception as e:  # noqa: BLE001 - every process must hear of it
            failure = e
            payload = json.dumps({"error": str(e), "type": type(e).__name__}).encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    data = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        data[:] = np.frombuffer(payload, np.uint8)
    answer = json.loads(np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes())
    if failure is not None:
        raise failure
    if "error" in answer:
        if answer["type"] == "ValueError":
            raise ValueError(answer["error"])
        raise RuntimeError(f"process 0 failed: {answer['type']}: {answer['error']}")
    return answer["value"]


def _runs(options, policy, policies) -> dict:
    """{run name: policy} from evaluate's policy / policies arguments."""
    if policies is None:
        return {options.run: policy}
    if policy is not None:
        raise ValueError(f"policy={policy!r} and policies= given; pass one of them")
    if not isinstance(policies, dict) or not policies:
        raise ValueError(f"policies={policies!r}; expected a non-empty dict {{run name: policy "
                         f"or None}}")
    for run in policies:
        if not isinstance(run, str) or not run or "/" in run:
            raise ValueError(f"policies has run name {run!r}; expected non-empty names "
                             f"without '/'")
    return dict(policies)


def _generate_runs(params, cfg, prompts, lengths, budget, runs, stop, generate_fn, timing,
                   split=None):
    """{run: (tokens [B, budget], counts [B])} for one batch; generate_fn None: one shared
    prefill for every policy that can share it. split: None (every policy compresses the whole
    prompt), or (contexts, context lengths, questions, question lengths) of kvpress's protocol:
    a policy then compresses the context and the question is appended after it."""
    out = {}
    if generate_fn is None:
        together = {run: p for run, p in runs.items() if shares_prefill(p)}
        if together:
            times = {}
            if split is None:
                inputs = dict(prompts=prompts, lengths=lengths)
            else:
                inputs = dict(prompts=split[0], lengths=split[1], questions=split[2],
                              question_lengths=split[3])
            results = shared_prefill_generate(params, cfg, **inputs, max_new_tokens=budget,
                                              policies=tuple(together.values()),
                                              stop_tokens=stop, timings=times)
            timing["prefill_s"] += times["prefill_s"]
            timing["prefill_cpu_s"] += times["prefill_cpu_s"]
            for i, (run, result) in enumerate(zip(together, results)):
                out[run] = result
                timing["generate_s"][run] += times["decode_s"][i]
                timing["generate_cpu_s"][run] += times["decode_cpu_s"][i]
        generate_fn = default_generate_fn(cfg)
    for run, policy in runs.items():
        if run in out:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        if split is not None and policy is not None:
            tokens, count = question_generate(params, cfg, split[0], split[2],
                                              context_lengths=split[1],
                                              question_lengths=split[3], max_new_tokens=budget,
                                              policy=policy, stop_tokens=stop)
        else:
            tokens, count = generate_fn(params, cfg, prompts, lengths=lengths,
                                        max_new_tokens=budget, policy=policy, stop_tokens=stop,
                                        temperature=0.0)
        # Dispatch is asynchronous: wait, so the model's time is not billed to the decoding
        # and scoring after it.
        out[run] = jax.block_until_ready((tokens, count))
        timing["generate_s"][run] += time.perf_counter() - t0
        timing["generate_cpu_s"][run] += time.process_time() - c0
    return {run: out[run] for run in runs}


def _check_protocol(cfg, runs, generate_fn):
    """Raises ValueError where kvpress's protocol (compress_question=False) cannot run a
    policy: a custom generate_fn, a model that is not plain RoPE, a decode-time policy."""
    from lcm.cache import is_prefill_press
    for run, policy in runs.items():
        if policy is None:
            continue  # nothing compressed: the one-shot prompt gives the same tokens
        fix = ("or set EvalOptions(compress_question=True) to compress the whole prompt, "
               "question included")
        if generate_fn is not None:
            name = getattr(generate_fn, "__name__", generate_fn)
            raise ValueError(f"run {run!r}: generate_fn={name} with policy={policy!r} "
                             f"compresses the whole prompt; kvpress's protocol (the default) "
                             f"appends the question after compression with "
                             f"lcm.eval.generation.question_generate: leave generate_fn None, "
                             f"{fix}")
        if cfg.positions.type != "rope":
            raise ValueError(f"run {run!r}: policy={policy!r} with cfg.positions.type="
                             f"{cfg.positions.type!r}: appending the question after "
                             f"compression needs lcm.cache's RoPE cache; {fix}")
        if not is_prefill_press(policy):
            raise ValueError(f"run {run!r}: policy={policy!r}; expected None or a prefill "
                             f"press from lcm.cache")


def split_point(record: Record) -> int:
    """Where kvpress's protocol splits `record.prompt` (a character index): after the first
    occurrence of `record.context` in it, else before the last occurrence of `record.question`;
    ValueError when neither appears."""
    if record.context and (at := record.prompt.find(record.context)) >= 0:
        return at + len(record.context)
    if record.question and (at := record.prompt.rfind(record.question)) >= 0:
        return at
    raise ValueError(f"record {record.id!r}: neither its context nor its question appears in "
                     f"its prompt, so the prompt cannot be split into a context to compress and "
                     f"a question appended after it (kvpress's protocol); set EvalOptions("
                     f"compress_question=True) to compress the whole prompt")


def question_tokens(record: Record, tokenizer) -> int:
    """How many of the prompt's last tokens are the question under kvpress's protocol: the
    prompt's tokens after the longest prefix they share with `tokenizer.encode(prompt[:split])`
    (`split_point`)."""
    ids = tokenizer.encode(record.prompt)
    head = tokenizer.encode(record.prompt[:split_point(record)])
    shared = 0
    for a, b in zip(ids, head):
        if a != b:
            break
        shared += 1
    return len(ids) - shared


def _split_rows(batch, items, prompts, lengths, tokenizer, options, counts):
    """(contexts [b, bucket], context lengths [b], questions [b, Q], question lengths [b]) of
    this process's rows (as `_local_rows` filled them) under kvpress's protocol; Q is a
    multiple of 16. counts caches the question tokens per record id."""
    records = list(batch["records"])
    valid = batch["valid"]
    fill = records[int(np.flatnonzero(valid)[0])] if valid.any() else items[0][0]
    b = prompts.shape[0]
    q = np.zeros(b, np.int32)
    for r in range(b):
        record = records[r] if valid[r] else fill
        if record.id not in counts:
            counts[record.id] = question_tokens(record, tokenizer)
        q[r] = counts[record.id]
        kept = int(lengths[r])
        dropped = int(batch["truncated"][r]) if valid[r] else 0
        # "middle" keeps the first and last kept // 2 tokens: the question must be in the
        # last half; otherwise at least one context token must stay before it.
        most = kept // 2 if dropped and options.truncation == "middle" else kept - 1
        if q[r] > most:
            raise ValueError(f"record {record.id!r}: its question ({q[r]} tokens) does not fit "
                             f"after a context of at least one token in the {kept} prompt "
                             f"tokens kept; set EvalOptions(compress_question=True), a larger "
                             f"max_length, or a shorter question")
    width = max(16, -(-int(q.max()) // 16) * 16)
    questions = np.zeros((b, width), np.int32)
    contexts = np.array(prompts, copy=True)
    for r in range(b):
        n, k = int(lengths[r]), int(q[r])
        questions[r, :k] = prompts[r, n - k:n]
        contexts[r, n - k:n] = pad_id(tokenizer)
    return contexts, (np.asarray(lengths) - q).astype(np.int32), questions, q


def _batches(records, tokenizer, limit, options, shards):
    """(an iterator over batches, their prompt + generation tokens). A batch is (its global
    rows [(record or None for padding, kept prompt tokens, tokens cut)], this process's rows
    from the `lcm.data` pipeline). Prompts are right-padded to a multiple of
    options.pad_multiple, grouped by (padded length, generation budget) in that order, records
    in order within a group; a prompt longer than `limit` - its budget is cut by
    `lcm.data.Truncation(options.truncation)` or rejected. Rows per batch are a multiple of
    `shards` (at least shards)."""
    source = grain.MapDataset.source(records)
    index = length_index(source, tokenizer)
    groups: dict[tuple[int, int], list[int]] = {}
    total = 0
    for i, (record, n) in enumerate(zip(records, index.num_tokens.tolist())):
        room = None if limit is None else limit - record.max_new_tokens
        if room is not None and n > room and (options.truncation == "error" or room < 2):
            raise ValueError(
                f"record {record.id!r}: {n} prompt tokens + max_new_tokens="
                f"{record.max_new_tokens} exceed the model's usable length {limit}; extend the "
                f"context (RopeConfig scaling with a larger max_position_embeddings, or "
                f"PositionConfig self_extend), or set EvalOptions(truncation='middle'|'left') "
                f"or max_length=")
        kept = n if room is None else Truncation(policy=options.truncation).kept(n, room)
        bucket = -(-kept // options.pad_multiple) * options.pad_multiple
        groups.setdefault((bucket, record.max_new_tokens), []).append(i)
        total += kept + record.max_new_tokens

    def batches():
        for (bucket, budget), members in sorted(groups.items()):
            rows = options.batch_size
            if options.batch_tokens is not None:
                rows = max(1, min(rows, options.batch_tokens // bucket))
            rows = max(shards, rows - rows % shards)
            # The group's cap: its room (limit - budget), or the bucket when that is smaller
            # (then nothing in the group is cut further: every kept prompt fits the bucket).
            cap = bucket if limit is None else min(limit - budget, bucket)
            truncation = Truncation(policy=options.truncation,
                                    max_tokens=cap if cap >= 2 else None)
            sub = LengthIndex(tuple(index.ids[i] for i in members), index.num_tokens[members],
                              index.max_new_tokens[members], index.tokenizer)
            processes = jax.process_count()
            plan = plan_batches(sub, buckets=[bucket], batch_size=rows, truncation=truncation,
                                process_count=processes)
            group = [records[i] for i in members]
            local = batch_dataset(grain.MapDataset.source(group), plan, tokenizer,
                                  truncation=truncation, process_index=jax.process_index(),
                                  process_count=processes)
            for spec, batch in zip(plan, local):
                items = []
                for j in spec.indices:
                    n = int(sub.num_tokens[j]) if j >= 0 else 0
                    kept = truncation.kept(n, truncation.max_tokens or bucket)
                    items.append((group[j], kept, n - kept) if j >= 0 else (None, 0, 0))
                yield items, batch

    return batches(), total


def _local_rows(batch, items, tokenizer, options):
    """This process's prompts [b, bucket] and lengths [b]; padding rows repeat a real prompt
    (the first of this process's rows, else the batch's first), so shapes stay static and
    every row is a valid prompt."""
    prompts, lengths, valid = batch["tokens"], batch["lengths"], batch["valid"]
    if valid.any():
        first = np.flatnonzero(valid)[0]
        prompts[~valid], lengths[~valid] = prompts[first], lengths[first]
    else:  # another process holds this batch's real rows
        first = encode_batch([items[0][0]], tokenizer, bucket=batch["bucket"],
                             max_new_tokens=batch["max_new_tokens"],
                             truncation=Truncation(policy=options.truncation,
                                                   max_tokens=items[0][1] or None))
        prompts[~valid], lengths[~valid] = first["tokens"][0], first["lengths"][0]
    return prompts, lengths


def _replicate(params, mesh):
    """params on every device of `mesh` (leaves already sharded over it are kept)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(put, params)


def _to_mesh(local, mesh, axis):
    """A global array from each process's rows, its first axis split over `axis`."""
    spec = PartitionSpec(axis, *([None] * (local.ndim - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)


def _row(run, record, num_tokens, dropped, out, count, stop, tokenizer) -> dict:
    gen = trim_generation(out, count, record.max_new_tokens, stop)
    prediction = tokenizer.decode(gen)
    return {"run": run, "id": record.id, "task": record.task, "length": record.length,
            "depth": record.depth, "metric": record.metric, "prediction": prediction,
            "answers": list(record.answers),
            "score": score_sample(record.metric, prediction, record.answers, task=record.task,
                                  all_classes=record.all_classes),
            "num_prompt_tokens": num_tokens, "num_generated": len(gen),
            "truncated_tokens": dropped, "meta": record.meta}


def _rounded(value):
    if isinstance(value, dict):
        return {k: round(v, 3) for k, v in value.items()}
    return round(value, 3)


def _progress(total, options):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True,
                disable=not options.progress or jax.process_index() != 0,
                desc=f"eval[{options.run}]", smoothing=0.1)
