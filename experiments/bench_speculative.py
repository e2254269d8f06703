"""Self-speculative decoding (`lcm.cache.Speculative`) against plain greedy decoding, in one run.

Per context: one prefill of an English-like essay (`lcm.data.haystack.essay_words`) keeps the
full cache and what the draft presses observe; each draft press (`budget` entries per kv head)
compresses it into its draft cache. From these, one jitted loop each generates `new_tokens`
greedy tokens: plain decoding (`decode_step` on the full cache) and speculative decoding for
every (draft, gamma). Each run is timed after a warm-up that compiles it (median of
`repeats`); the tokens must be plain decoding's, token for token (the table says so per row).
Where speculation is not faster, the split explains why: the time of one draft step (the
model on the draft cache), one verification (`extend` of gamma + 1 tokens on the full cache)
and one plain step, each timed alone.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.workdir import write_summary

DRAFTS = ("streaming_llm", "snapkv")


def load(model: str):
    """(cfg, params, encode) of SmolLM2-135M (float32) or of a random tiny model."""
    import dataclasses

    from lcm.config import AttentionConfig, ModelConfig
    if model == "tiny":
        from lcm.model import init_params
        cfg = ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, intermediate_size=48,
                          attention=AttentionConfig(impl="xla", block_q=64, block_k=64))
        return cfg, init_params(cfg, jax.random.key(0))[0], lambda text: list(
            text.encode("utf-8"))
    if model != "smollm2":
        raise ValueError(f"config.model={model!r}; expected 'smollm2' or 'tiny'")
    from lcm.io import load_smollm2
    cfg, params, tok = load_smollm2(dtype=jnp.float32)
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(
        cfg.attention, impl="xla", block_q=512, block_k=512))
    return cfg, params, tok.encode


def prompt(encode, length: int) -> np.ndarray:
    """The first `length` tokens of the essay."""
    from lcm.data.haystack import essay_words
    words = essay_words(length)  # a token is at most a word here, so this is long enough
    ids = encode(" ".join(words))
    if len(ids) < length:
        raise ValueError(f"the essay gave {len(ids)} tokens; {length} needed")
    return np.asarray(ids[:length], np.int32)


def make_draft(name: str, budget: int):
    from lcm.cache import SnapKV, StreamingLLM
    if name == "streaming_llm":
        return StreamingLLM(budget=budget)
    if name == "snapkv":
        return SnapKV(budget=budget)
    raise ValueError(f"config.drafts: {name!r}; expected names from {list(DRAFTS)}")


def timed(fn, *args, repeats: int):
    """(result, median seconds of `repeats` runs after a warm-up run)."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def bench_context(cfg, params, ids, drafts, gammas, budget, new_tokens, repeats) -> list[dict]:
    from lcm.cache import prefill_observed
    from lcm.cache.compress import compress_jit
    from lcm.cache.extend import extend_layers
    from lcm.cache.generate import sampling_loop
    from lcm.cache.prefill import decode_step_jit
    from lcm.cache.speculative import speculative_decode

    tokens = jnp.asarray(ids)[None]
    presses = {name: make_draft(name, budget) for name in drafts}
    room = new_tokens + max(gammas) + 2
    start = time.perf_counter()
    logits, cache, obs = prefill_observed(params, tokens, cfg, tuple(presses.values()))
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - start
    full = cache.grow(room)
    smalls = {name: compress_jit(cache, p, obs, cfg=cfg, room=room, layout="uniform",
                                 full_rows=True) for name, p in presses.items()}
    key = jax.random.key(0)

    @jax.jit
    def plain(params, cache, logits):
        step = lambda c, t: decode_step_jit(params, c, t, cfg=cfg, policy=None)  # noqa: E731
        return sampling_loop(step, cache, logits, key, max_new_tokens=new_tokens, stop=(),
                             temperature=0.0, top_k=None, top_p=None, pad_token=0)

    def speculative(gamma):
        return jax.jit(lambda params, full, small, logits: speculative_decode(
            params, full, small, logits, key, cfg=cfg, gamma=gamma, max_new_tokens=new_tokens,
            stop=(), temperature=0.0, top_k=None, top_p=None, pad_token=0))

    step_one = jax.jit(lambda params, cache, t: extend_layers(
        params, cache, t, jnp.full((1,), t.shape[1], jnp.int32), cfg=cfg, logits="last"))
    (want, _), plain_s = timed(plain, params, full, logits, repeats=repeats)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    _, plain_step_s = timed(jax.jit(lambda p, c, t: decode_step_jit(p, c, t, cfg=cfg,
                                                                    policy=None)),
                            params, full, token, repeats=repeats)
    rows = [dict(context=len(ids), method="plain", draft=None, gamma=None,
                 tokens_per_s=new_tokens / plain_s, speedup=1.0, identical=True,
                 acceptance=None, prefill_s=prefill_s, plain_step_ms=1e3 * plain_step_s)]
    print(rows[-1], flush=True)
    for gamma in gammas:
        run = speculative(gamma)
        _, verify_s = timed(step_one, params, full, jnp.zeros((1, gamma + 1), jnp.int32),
                            repeats=repeats)
        for name in drafts:
            (got, _, stats), spec_s = timed(run, params, full, smalls[name], logits,
                                            repeats=repeats)
            _, draft_s = timed(step_one, params, smalls[name], token[:, None], repeats=repeats)
            rows.append(dict(
                context=len(ids), method="speculative", draft=name, gamma=gamma,
                tokens_per_s=new_tokens / spec_s, speedup=plain_s / spec_s,
                identical=bool(np.array_equal(got, want)),
                acceptance=float(stats["accepted"].sum() / stats["drafted"].sum()),
                rounds=int(stats["rounds"]), draft_step_ms=1e3 * draft_s,
                verify_ms=1e3 * verify_s, plain_step_ms=1e3 * plain_step_s))
            print(rows[-1], flush=True)
    return rows


def table(rows) -> str:
    lines = ["| context | method | draft | gamma | tokens identical | acceptance | rounds | "
             "decode tok/s | vs plain | draft step ms | verify ms | plain step ms |",
             "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        spec = r["method"] == "speculative"
        accept = f"{r['acceptance']:.2f}" if spec else "-"
        draft_ms = f"{r['draft_step_ms']:.1f}" if spec else "-"
        verify_ms = f"{r['verify_ms']:.1f}" if spec else "-"
        lines.append(
            f"| {r['context']} | {r['method']} | {r['draft'] or '-'} | {r['gamma'] or '-'} | "
            f"{'yes' if r['identical'] else 'NO'} | {accept} | {r.get('rounds', '-')} | "
            f"{r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | {draft_ms} | {verify_ms} | "
            f"{r['plain_step_ms']:.1f} |")
    return "\n".join(lines)


def run(config, workdir: str) -> dict:
    contexts = [int(c) for c in config.contexts]
    drafts = [n for item in ([config.drafts] if isinstance(config.drafts, str)
                             else config.drafts) for n in str(item).split(",") if n]
    gammas = [int(g) for g in config.gammas]
    budget, new_tokens, repeats = int(config.budget), int(config.new_tokens), int(config.repeats)
    for name in drafts:
        make_draft(name, 1)
    if not contexts or budget >= min(contexts) or min(gammas) < 1 or new_tokens < 1:
        raise ValueError(f"config: contexts={contexts}, budget={budget}, gammas={gammas}, "
                         f"new_tokens={new_tokens}; expected budget < every context, gammas "
                         f">= 1, new_tokens >= 1")
    cfg, params, encode = load(config.model)
    header = (f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
              f"load avg {'/'.join(f'{x:.1f}' for x in os.getloadavg())}, jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}; model {config.model} (float32), batch 1, "
              f"{new_tokens} greedy tokens; draft caches {budget} entries per kv head; median "
              f"of {repeats} runs after a warm-up")
    print(header, flush=True)
    rows = []
    for context in contexts:
        rows += bench_context(cfg, params, prompt(encode, context), drafts, gammas, budget,
                              new_tokens, repeats)
    text = table(rows)
    print("\n" + text, flush=True)
    return write_summary(workdir, {"machine": header, "rows": rows},
                         markdown=f"{header}\n\n{text}")
