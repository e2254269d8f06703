"""Benchmarks Self-Extend decoding on SmolLM2-135M: the KV-cache path (`lcm.cache.extended`)
against the forward-only greedy loop (`lcm.eval.greedy_generate`, what Self-Extend runs used
before) and against plain-RoPE decoding (`lcm.cache`), in one process.

For each context length (batch 1, float32, a random prompt): prefill once under Self-Extend
(`window`, `group_size`), then time `decode_steps` greedy steps of the extended cache, one
jitted `lax.fori_loop` after a warm-up run that compiles, the fastest of `repeats` runs (the
machine may be shared). The same for plain RoPE's `lcm.cache.decode_step` on the same prompt,
its runs alternating with the extended ones: the cost of re-rotating un-rotated keys every step.
For each of `forward_contexts`: the forward-only loop generating `forward_steps` tokens (each
one a full forward over prompt + generated tokens), timed the same way. Ratios are tokens/s over
the peer's; the forward-only ratio pairs each context with the forward-only loop at the same
context when it was measured. CPU seconds per token (this process, all threads) are printed
beside: on a shared machine they move less than wall time.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time

import jax
import jax.numpy as jnp

from experiments.workdir import write_summary
from lcm.cache import decode_step as rope_decode_step
from lcm.cache import extended
from lcm.cache import prefill as rope_prefill
from lcm.config import AttentionConfig, PositionConfig
from lcm.eval import greedy_generate


def _fastest(fn, repeats):
    """(wall seconds, CPU seconds of this process) of the fastest of `repeats` runs of fn."""
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return min(times)


def _decode_loop(step_fn, cfg, steps):
    @jax.jit
    def loop(params, cache, token):
        def body(_, carry):
            cache, token = carry
            logits, cache = step_fn(params, cache, token, cfg)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (cache, token))
    return loop


def prepared_decode(params, cfg, prompt, prefill_fn, step_fn, steps):
    """(prefill seconds, a no-argument decode run, cache bytes) of one cache path; the decode
    run is compiled and warmed up."""
    run_prefill = jax.jit(lambda p, t: prefill_fn(p, t, cfg, max_new_tokens=steps))
    run_prefill = run_prefill.lower(params, prompt).compile()
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(run_prefill(params, prompt))
    prefill_s = time.perf_counter() - start  # one run, compiled beforehand
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    loop = _decode_loop(step_fn, cfg, steps)
    jax.block_until_ready(loop(params, cache, token))  # compile + warm up
    return prefill_s, lambda: loop(params, cache, token), cache.nbytes()


def interleaved(runs, repeats):
    """The fastest (wall, CPU) seconds of each of `runs`, timed in turn `repeats` times so that
    a change in the machine's load falls on all of them alike."""
    best = [None] * len(runs)
    for _ in range(repeats):
        for i, fn in enumerate(runs):
            start, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            t = (time.perf_counter() - start, time.process_time() - cpu)
            best[i] = t if best[i] is None else min(best[i], t)
    return best


def run(config, workdir: str) -> dict:
    """Prints and writes (results.md, summary.json) the table for `config`'s fields."""
    from lcm.io import load_smollm2
    contexts = [int(c) for c in config.contexts]
    forward_contexts = [int(c) for c in config.forward_contexts]
    steps, repeats = int(config.decode_steps), int(config.repeats)
    base, params, _ = load_smollm2()
    block = AttentionConfig(impl="xla", block_q=config.block, block_k=config.block)
    cfg = dataclasses.replace(base, attention=block, positions=PositionConfig(
        type="self_extend", window=config.window, group_size=config.group_size))
    rope_cfg = dataclasses.replace(base, attention=block)
    header = (f"machine: {os.cpu_count()} CPUs, {jax.default_backend()}, jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}, load average {os.getloadavg()[0]:.1f} at "
              f"start; SmolLM2-135M float32, batch 1; Self-Extend window {config.window}, group "
              f"{config.group_size}; {steps} decode steps (forward-only: "
              f"{config.forward_steps} tokens), fastest of {repeats}")
    print(header, flush=True)
    forward_tps = {}
    for context in forward_contexts:
        prompt = jax.random.randint(jax.random.key(context), (1, context), 0, cfg.vocab_size)
        lengths = jnp.array([context], jnp.int32)
        gen = jax.jit(lambda p, t, n: greedy_generate(p, cfg, t, lengths=n,
                                                      max_new_tokens=config.forward_steps))
        seconds, _ = _fastest(lambda: gen(params, prompt, lengths), repeats)
        forward_tps[context] = config.forward_steps / seconds
        print(f"  {context:>6} forward-only {forward_tps[context]:8.3f} tok/s", flush=True)
    rows = []
    for context in contexts:
        prompt = jax.random.randint(jax.random.key(context), (1, context), 0, cfg.vocab_size)
        ext_prefill, ext_run, ext_bytes = prepared_decode(
            params, cfg, prompt, extended.prefill, extended.decode_step, steps)
        _, rope_run, rope_bytes = prepared_decode(params, rope_cfg, prompt, rope_prefill,
                                                  rope_decode_step, steps)
        (ext_s, ext_cpu), (rope_s, rope_cpu) = (
            (wall / steps, cpu / steps) for wall, cpu in interleaved([ext_run, rope_run],
                                                                     repeats))
        row = dict(context=context, extended_tokens_per_s=1 / ext_s,
                   rope_cache_tokens_per_s=1 / rope_s, vs_rope_cache=rope_s / ext_s,
                   extended_cpu_s_per_token=ext_cpu, rope_cache_cpu_s_per_token=rope_cpu,
                   extended_prefill_s=ext_prefill, extended_cache_bytes=ext_bytes,
                   rope_cache_bytes=rope_bytes,
                   forward_only_tokens_per_s=forward_tps.get(context),
                   vs_forward_only=(1 / ext_s / forward_tps[context]
                                    if context in forward_tps else None))
        rows.append(row)
        print(f"  {context:>6} extended {1 / ext_s:8.2f} tok/s ({ext_cpu:.3f} CPU s/token), "
              f"plain-RoPE cache {1 / rope_s:8.2f} tok/s ({rope_cpu:.3f} CPU s/token), "
              f"prefill {ext_prefill:.1f} s", flush=True)
    table = _table(rows)
    print(table, flush=True)
    summary = dict(header=header, rows=rows, forward_only=forward_tps, decode_steps=steps)
    return write_summary(workdir, summary, markdown=header + "\n\n" + table)


def _table(rows) -> str:
    lines = ["| context | extended cache tok/s | forward-only tok/s | vs forward-only | "
             "plain-RoPE cache tok/s | vs plain RoPE | CPU s/token extended / plain | "
             "cache MiB | prefill s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fwd = r["forward_only_tokens_per_s"]
        lines.append(
            f"| {r['context']} | {r['extended_tokens_per_s']:.2f} | "
            f"{'-' if fwd is None else f'{fwd:.3f}'} | "
            f"{'-' if fwd is None else f'{r['vs_forward_only']:.1f}x'} | "
            f"{r['rope_cache_tokens_per_s']:.2f} | {r['vs_rope_cache']:.2f}x | "
            f"{r['extended_cpu_s_per_token']:.3f} / {r['rope_cache_cpu_s_per_token']:.3f} | "
            f"{r['extended_cache_bytes'] / 2**20:.0f} | {r['extended_prefill_s']:.1f} |")
    return "\n".join(lines)
