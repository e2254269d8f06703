"""Benchmarks KV cache policies: cache bytes and decode speed vs context length, in one run.

On a small random Llama-shaped model (config fields model_*; float32, batch 1), for each
context length: prefill a random prompt under each policy, then time `decode_steps` greedy
decode steps (one jitted `lax.fori_loop`, after a warm-up run that compiles; the fastest of
`repeats` runs, since the machine may be shared). Policies, all at the same token budget per
kv head (`budget`):

  full            no policy: every prompt token kept (decode writes the new entries in place)
  full_mapped     the same cache through the step decode policies use, which maps every
                  layer to a new one (the full-cache decode path before in-place writes)
  streaming_llm   StreamingLLM(budget=budget)              (4 sinks + recent)
  snapkv          SnapKV(budget=budget)                    (window 64, avg pool 5)
  pyramidkv       PyramidKV(budget=budget, beta=4)         (SnapKV scores, layer budgets
                                                            falling with depth, mean = budget,
                                                            a capacity per layer; beta 4: with
                                                            kvpress's 20 the smallest budget
                                                            falls under the window and every
                                                            layer keeps `budget`)
  adakv           AdaKV(SnapKV(budget=budget))             (head-wise budgets: each layer's
                                                            heads share a pool of heads *
                                                            budget entries)
  duo             DuoAttention(head_compression_ratio=duo_ratio) with random head scores:
                  streaming heads keep 64 sinks + (budget - 64) recent, retrieval heads all
  quest           Quest(token_budget=budget, page_size=16): reads budget tokens per step,
                  keeps every token (nothing is evicted); the selected pages drive the
                  blockwise xla path as a runtime BlockMask
  quest_gather    the same selection, read with impl="gather" (pages copied out, dense)
  kivi2 / kivi4   KIVI(bits=2 / 4, group_size=32, residual_length=32): keeps every token
  kivi2_snapkv    KIVI(bits=2, ..., evict=SnapKV(budget=budget)): SnapKV's entries, 2-bit

Cache bytes are those of the cache pytree (`nbytes()`: what the device holds after prefill,
including room for the decoded tokens). Ratios are against the full cache at the same context.
Targets: eviction policies' bytes and decode time flat in the context; head-wise and
layer-wise policies' bytes <= budget / context of full (AdaKV, PyramidKV; DuoAttention's
retrieval heads keep every token by design, so its check is against the split's own size);
KIVI 2-bit <= 0.2x full.

The peer figures (transformers + kvpress, same model shape and settings, CPU torch) come from
experiments/bench_cache_peer.py, run in the side environment.
"""

from __future__ import annotations

import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.workdir import write_summary
from lcm.cache import AdaKV, PyramidKV, SnapKV, StreamingLLM, decode_step, prefill
from lcm.cache.presses.duo import DuoAttention
from lcm.cache.formats import policy_decode_step, policy_prefill
from lcm.cache.presses.kivi import KIVI
from lcm.cache.prefill import mapped_decode_step
from lcm.cache.presses.quest import Quest
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import init_params

POLICIES = ("full", "full_mapped", "streaming_llm", "snapkv", "pyramidkv", "adakv", "duo",
            "quest", "quest_gather", "kivi2", "kivi4", "kivi2_snapkv")
EVICTION = ("streaming_llm", "snapkv", "pyramidkv", "adakv", "duo")
DUO_SINKS = 64


def model_config(config) -> ModelConfig:
    return ModelConfig(vocab_size=config.model_vocab, hidden_size=config.model_hidden,
                       num_layers=config.model_layers, num_heads=config.model_heads,
                       num_kv_heads=config.model_kv_heads, head_dim=config.model_head_dim,
                       intermediate_size=2 * config.model_hidden,
                       max_position_embeddings=1 << 20,
                       attention=AttentionConfig(impl="xla", block_q=512, block_k=512))


def make_policy(name: str, budget: int, cfg: ModelConfig, duo_ratio: float):
    """The policy object of `name` at `budget` tokens per kv head (None for full)."""
    if name in ("full", "full_mapped"):
        return None
    if name == "streaming_llm":
        return StreamingLLM(budget=budget)
    if name == "snapkv":
        return SnapKV(budget=budget)
    if name == "pyramidkv":
        return PyramidKV(budget=budget, beta=4)
    if name == "adakv":
        return AdaKV(SnapKV(budget=budget))
    if name == "duo":
        scores = np.random.default_rng(0).uniform(size=(cfg.num_layers, cfg.num_kv_heads))
        return DuoAttention(head_scores=scores, threshold=None, head_compression_ratio=duo_ratio,
                            sink_size=DUO_SINKS, recent_size=budget - DUO_SINKS)
    if name == "quest":
        return Quest(token_budget=budget, page_size=16)
    if name == "quest_gather":
        return Quest(token_budget=budget, page_size=16, impl="gather")
    if name in ("kivi2", "kivi4"):
        return KIVI(bits=int(name[-1]), group_size=32, residual_length=32)
    if name == "kivi2_snapkv":
        return KIVI(bits=2, group_size=32, residual_length=32, evict=SnapKV(budget=budget))
    raise ValueError(f"policy={name!r}; expected one of {list(POLICIES)}")


def _decode_loop(step_fn, cfg, steps):
    @jax.jit
    def loop(params, cache, token):
        def body(_, carry):
            cache, token = carry
            logits, cache = step_fn(params, cache, token, cfg)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (cache, token))
    return loop


def measure(params, cfg, prompt, name, policy, steps, repeats):
    """(cache bytes after prefill, decode seconds per step)."""
    owned = name in ("duo", "quest", "quest_gather", "kivi2", "kivi4", "kivi2_snapkv")
    if owned:
        logits, cache = policy_prefill(params, prompt, cfg, policy=policy, max_new_tokens=steps)
        loop = _decode_loop(policy_decode_step, cfg, steps)
    else:
        logits, cache = prefill(params, prompt, cfg, policy=policy, max_new_tokens=steps)
        step = decode_step
        if name == "full_mapped":
            def step(params, cache, token, cfg):
                return mapped_decode_step(params, cache, token, cfg=cfg, policy=None)
        loop = _decode_loop(step, cfg, steps)
    nbytes = cache.nbytes()
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    jax.block_until_ready(loop(params, cache, token))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(loop(params, cache, token))
        times.append(time.perf_counter() - start)
    return nbytes, min(times) / steps


def run(config, workdir: str) -> dict:
    """Prints and writes (results.md, summary.json) the table for `config`'s fields."""
    contexts = [int(c) for c in config.contexts]
    names = config.policies
    names = [n for item in ([names] if isinstance(names, str) else names)
             for n in str(item).split(",") if n]  # "--config.policies=a,b" arrives as one item
    for name in names:
        if name not in POLICIES:
            raise ValueError(f"policies: {name!r}; expected names from {list(POLICIES)}")
    if "full" not in names:
        names.insert(0, "full")
    budget, steps = int(config.budget), int(config.decode_steps)
    if budget <= DUO_SINKS or budget >= min(contexts):
        raise ValueError(f"budget={budget}; expected {DUO_SINKS} < budget < the smallest "
                         f"context {min(contexts)}")
    cfg = model_config(config)
    params = init_params(cfg, jax.random.key(0))[0]
    header = (f"machine: {os.cpu_count()} CPUs, {jax.default_backend()}, jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}; model: {cfg.num_layers} layers, "
              f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads x {cfg.head_dim}, hidden "
              f"{cfg.hidden_size}, float32, batch 1; budget {budget} tokens per kv head, "
              f"{steps} decode steps, duo head_compression_ratio {config.duo_ratio}")
    print(header, flush=True)
    rows = []
    for context in contexts:
        prompt = jax.random.randint(jax.random.key(context), (1, context), 0, cfg.vocab_size)
        full = None
        for name in names:
            policy = make_policy(name, budget, cfg, config.duo_ratio)
            nbytes, seconds = measure(params, cfg, prompt, name, policy, steps, config.repeats)
            if name == "full":
                full = (nbytes, seconds)
            row = dict(context=context, policy=name, cache_bytes=nbytes,
                       bytes_vs_full=nbytes / full[0], tokens_per_s=1.0 / seconds,
                       speed_vs_full=full[1] / seconds)
            rows.append(row)
            print(f"  {context:>6} {name:<14} {nbytes / 2**20:9.2f} MiB "
                  f"{row['bytes_vs_full']:6.3f}x  {row['tokens_per_s']:8.1f} tok/s "
                  f"{row['speed_vs_full']:6.2f}x", flush=True)
    table = _table(rows)
    checks = _checks(rows, names, budget, steps, config.duo_ratio)
    print(table + "\n\n" + "\n".join(checks), flush=True)
    summary = dict(header=header, rows=rows, checks=checks, budget=budget, decode_steps=steps)
    return write_summary(workdir, summary, markdown="\n\n".join(
        [header, table, "\n".join(f"- {c}" for c in checks)]))


def _table(rows) -> str:
    lines = ["| context | policy | cache MiB | bytes vs full | decode tok/s | speed vs full |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['policy']} | {r['cache_bytes'] / 2**20:.2f} | "
                     f"{r['bytes_vs_full']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{r['speed_vs_full']:.2f} |")
    return "\n".join(lines)


def _checks(rows, names, budget, steps, duo_ratio) -> list:
    """The targets, each with its measured value."""
    out = []
    by = {}
    for r in rows:
        by.setdefault(r["policy"], []).append(r)
    for name in names:
        if name not in EVICTION or name == "duo":
            continue
        rs = by[name]
        b = max(r["cache_bytes"] for r in rs) / min(r["cache_bytes"] for r in rs)
        t = max(1 / r["tokens_per_s"] for r in rs) / min(1 / r["tokens_per_s"] for r in rs)
        out.append(f"{name}: bytes max/min over contexts {b:.3f} (flat: 1.000), decode time "
                   f"max/min {t:.2f} (flat: ~1)")
    for r in by.get("adakv", []) + by.get("pyramidkv", []):
        bound = (budget + steps) / (r["context"] + steps)
        verdict = "ok" if r["bytes_vs_full"] <= bound * 1.01 else "over"
        out.append(f"{r['policy']} @ {r['context']}: bytes {r['bytes_vs_full']:.3f}x full vs "
                   f"(budget + steps) / (context + steps) {bound:.3f} -> {verdict}")
    for r in by.get("full_mapped", []):
        out.append(f"full decode @ {r['context']}: in-place step {1 / r['speed_vs_full']:.2f}x "
                   f"the speed of the layer-mapping step")
    for r in by.get("duo", []):
        # Retrieval heads keep every token; streaming heads keep sinks + recent = budget.
        ideal = (1 - duo_ratio) + duo_ratio * budget / (r["context"] + steps)
        verdict = "ok" if r["bytes_vs_full"] <= ideal * 1.01 else "over"
        out.append(f"duo @ {r['context']}: bytes {r['bytes_vs_full']:.3f}x full vs the split's "
                   f"own size {1 - duo_ratio:.2f} + {duo_ratio:.2f} * budget / (context + "
                   f"steps) = {ideal:.3f} -> {verdict}")
    snap = {r["context"]: r["cache_bytes"] for r in by.get("snapkv", [])}
    for r in by.get("kivi2_snapkv", []):
        vs = (f", {r['cache_bytes'] / snap[r['context']]:.3f}x snapkv" if r["context"] in snap
              else "")
        out.append(f"kivi2_snapkv @ {r['context']}: bytes {r['bytes_vs_full']:.4f}x full{vs}")
    for r in by.get("kivi2", []):
        out.append(f"kivi2 @ {r['context']}: bytes {r['bytes_vs_full']:.3f}x full (target <= 0.2)"
                   f" -> {'ok' if r['bytes_vs_full'] <= 0.2 else 'over'}")
    return out
