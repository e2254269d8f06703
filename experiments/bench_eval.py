"""Evaluation overheads: input pipeline throughput and the eval loop's time outside the model.

Part 1 times the Grain path from records to padded eval batches (`lcm.data.length_index`,
`plan_batches` with a constant token budget per batch, `batch_dataset`), read in this process
and through `workers` Grain worker processes (`mp_prefetch`), side by side over the same plan,
and prints steady-state records/s and prompt tokens/s (the batches after a warm-up of
2 x workers batches; the warm-up, which includes spawning workers, is reported apart) and the
ratio. Record
generation (fitting each prompt to its token budget) is timed separately: it happens once per
sample, before any batching.

Part 2 runs `lcm.eval.evaluate` on SmolLM2-135M with `lcm.cache.generate` and reports the share
of the loop's wall time spent outside generate_fn (tokenizing, batching, decoding, scoring,
writing the JSONL), the number the issue asks to keep under 5% at 8k tokens per sample.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import grain
from absl import flags, logging

from lcm.data import batch_dataset, length_index, make_niah, make_passkey, plan_batches
from lcm.eval import EvalOptions, evaluate


def _records(tokenizer, lengths, samples, seed):
    out = []
    for length in lengths:
        for i in range(samples):
            depth = (i + 0.5) / samples
            out.append(make_passkey(i, seed=seed, length=length, tokenizer=tokenizer,
                                    depth=depth))
            out.append(make_niah(i, seed=seed, length=length, tokenizer=tokenizer, depth=depth))
    return out


def _drain(iterable, warmup: int):
    """(seconds to the first `warmup` batches, seconds for the rest, rows, prompt tokens, padded
    tokens of real rows) of the batches after the warm-up (start-up, e.g. spawning workers and
    filling their queues, is timed apart)."""
    t0 = time.perf_counter()
    it = iter(iterable)
    for _ in range(warmup):
        next(it)
    t1 = time.perf_counter()
    rows = tokens = padded = 0
    for batch in it:
        valid = batch["valid"]
        rows += int(valid.sum())
        tokens += int(batch["lengths"][valid].sum())
        padded += int(valid.sum()) * batch["tokens"].shape[1]
    return t1 - t0, time.perf_counter() - t1, rows, tokens, padded


def bench_pipeline(config, tokenizer) -> dict:
    t0 = time.perf_counter()
    records = _records(tokenizer, tuple(config.pipeline_lengths), config.pipeline_samples,
                       config.seed)
    gen_s = time.perf_counter() - t0
    source = grain.MapDataset.source(records)
    t0 = time.perf_counter()
    index = length_index(source, tokenizer)
    index_s = time.perf_counter() - t0
    plan = plan_batches(index, buckets=sorted(set(config.pipeline_lengths)),
                        tokens_per_batch=config.tokens_per_batch)
    batches = batch_dataset(source, plan, tokenizer, process_index=0, process_count=1)
    if not flags.FLAGS.is_parsed():  # mp_prefetch reads absl flags (outside absl.app.run)
        flags.FLAGS(sys.argv[:1])
    warmup = 2 * config.workers
    if len(plan) < 4 * warmup:
        raise ValueError(f"{len(plan)} batches are too few to time past a warm-up of {warmup}; "
                         f"raise config.pipeline_samples or lower config.tokens_per_batch")
    results = {}
    for name in ("in_process", f"{config.workers}_workers"):
        passes = []
        for _ in range(config.pipeline_passes):
            it = batches.to_iter_dataset()
            if name != "in_process":
                it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.workers))
            passes.append(_drain(it, warmup))
        startup, seconds, rows, tokens, padded = min(passes, key=lambda p: p[1])
        results[name] = {"warmup_s": round(startup, 3), "seconds": round(seconds, 4),
                         "records_per_s": round(rows / seconds, 1),
                         "prompt_tokens_per_s": round(tokens / seconds),
                         "pad_fraction_real_rows": round(1 - tokens / padded, 3)}
    results["ratio_workers_over_in_process"] = round(
        results["in_process"]["seconds"] / results[f"{config.workers}_workers"]["seconds"], 2)
    results.update({"num_records": len(records), "num_batches": len(plan),
                    "generate_records_s": round(gen_s, 2),
                    "generate_records_per_s": round(len(records) / gen_s, 2),
                    "length_index_s": round(index_s, 4)})
    return results


def bench_loop(config, cfg, params, tokenizer, workdir) -> dict:
    records = [make_passkey(i, seed=config.seed, length=config.eval_length, tokenizer=tokenizer,
                            depth=(i + 0.5) / config.eval_samples,
                            max_new_tokens=config.eval_max_new_tokens)
               for i in range(config.eval_samples)]
    options = EvalOptions(run="bench", progress=False, heatmaps=False)
    summary = evaluate(params, cfg, records, tokenizer, f"{workdir}/loop", options=options,
                       resume=False)
    timing = summary["timing"]
    return {**timing, "length": config.eval_length, "samples": config.eval_samples,
            "model_s_per_sample": round(timing["model_s"] / config.eval_samples, 2)}


def run(config, workdir: str) -> dict:
    from experiments.workdir import write_summary
    from lcm.io import load_smollm2

    cfg, params, tokenizer = load_smollm2()
    summary = {"pipeline": bench_pipeline(config, tokenizer)}
    p = summary["pipeline"]
    lines = ["| reader | records/s | prompt tokens/s | padding in real rows | warm-up (s) |",
             "|---|---|---|---|---|"]
    for name in ("in_process", f"{config.workers}_workers"):
        r = p[name]
        lines.append(f"| {name} | {r['records_per_s']} | {r['prompt_tokens_per_s']} | "
                     f"{r['pad_fraction_real_rows']} | {r['warmup_s']} |")
    lines.append(f"\n{config.workers} workers / in-process speed: "
                 f"{p['ratio_workers_over_in_process']}x; record generation "
                 f"{p['generate_records_per_s']} records/s")
    if not config.skip_loop:
        shutil.rmtree(f"{workdir}/loop", ignore_errors=True)  # a fresh timing every run
        loop = summary["loop"] = bench_loop(config, cfg, params, tokenizer, workdir)
        lines.append(f"\neval loop at {loop['length']} tokens/sample: {loop['samples']} samples, "
                     f"model {loop['model_s']} s, loop {loop['loop_s']} s, outside the model "
                     f"{100 * loop['outside_model_share']:.2f}%")
    markdown = "\n".join(lines)
    logging.info("bench_eval:\n%s", markdown)
    print(markdown)
    summary["cpu_count"] = os.cpu_count()
    return write_summary(workdir, summary, markdown=markdown)
