"""`prefill` and `decode_step`: the decoder of `lcm.model` run against a KV cache.

Both run the layers under `lax.scan` (compile time does not grow with depth) and are jitted
with static shapes; arguments are checked before tracing. Prompts are right-padded `tokens
[B, T]` with real lengths `lengths [B]`: padding is never cached, each row continues at its
own position, so a batch gives what each prompt gives alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lcm.attention import attend
from lcm.cache import attention as cattn
from lcm.cache.chunked import chunked_prefill_jit
from lcm.cache.checks import (check_chunk, check_count, check_model, check_prompt,
                              check_tokens)
from lcm.cache.compress import (Observations, all_full, check_policy, check_windows,
                                is_prefill_press, keep_layer, layer_slots, observations_for,
                                observe_layer, presses_every_layer, window_plan)
from lcm.cache.formats import (PolicyCache, format_decode_step, format_prefill, owns_cache,
                               policy_decode_step)
from lcm.cache.decoding import check_decode_policy, decode_update, next_step, with_query_buffer
from lcm.cache.kv import (KVCache, cache_rotation, entries_valid, from_layer_slices, insert,
                          make_room,
                          layer_slices, prompt_entries, rank_positions)
from lcm.cache.layouts import check_layout, make_cache, storage
from lcm.cache.step import plain_decode_step, rotate_queries
from lcm.config import ModelConfig
from lcm.model import embed, rope_tables, run_layers, unembed
from lcm.positions import apply_rope


def prefill(params, tokens, cfg: ModelConfig, *, policy=None, lengths=None, chunk_size=None,
            max_new_tokens: int = 0, all_logits: bool = False, layout: str = "compact",
            prefill_chunk: int | None = None):
    """Runs the prompts and returns `(logits, cache)`.

    tokens [B, T] int (right-padded); lengths [B] int real lengths (default T). policy: an
    eviction policy from `lcm.cache` (None keeps every prompt token); it compresses each layer
    as soon as that layer is computed, so only one layer's full K/V exists at a time. chunk_size:
    attention runs blockwise in chunk_size blocks (default `cfg.attention.block_q`), and policy
    statistics over all queries (ObservedAttention) are gathered chunk by chunk: no [T, T]
    matrix is built. max_new_tokens: free slots per head for decoding without eviction.

    Returns logits float32 [B, vocab] at each row's last real token ([B, T, vocab] with
    all_logits=True) and a `KVCache` whose capacity is the policy's budget + max_new_tokens.
    layout: "compact" stores PyramidKV with a capacity per layer and AdaKV as per-layer pools
    of its heads' entries, so the bytes are the sum of the budgets; "uniform" gives every
    layer and head the largest budget, as decode-time policies (`decode_step(..., policy=)`)
    need (see `lcm.cache.layouts`).
    prefill_chunk: run the prompt this many tokens at a time against the growing cache
    (`lcm.cache.chunked`): activations are O(prefill_chunk x hidden) per layer instead of
    O(T x hidden), with the same logits and cache; a press compresses once at the end from
    statistics gathered chunk by chunk. None runs the prompt at once.
    """
    checked = check_prompt(tokens, cfg, lengths, params=params)
    full_rows = all_full(lengths, tokens.shape[1])
    lengths = checked
    chunk = check_chunk(chunk_size, cfg)
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    check_layout(layout)
    if policy is not None:
        check_policy(policy, cfg, tokens.shape[1])
        check_windows(policy, cfg, tokens.shape[1], max_new_tokens, layout)
    if prefill_chunk is not None:
        check_count("prefill_chunk", prefill_chunk, minimum=1)
        if owns_cache(policy):
            raise ValueError(f"prefill_chunk={prefill_chunk} with policy={type(policy).__name__}"
                             f", which keeps its own cache format; chunked prefill appends to "
                             f"a KVCache (prefill_chunk=None runs this policy)")
        return chunked_prefill_jit(params, tokens, lengths, cfg=cfg, policy=policy,
                                   chunk=int(prefill_chunk), room=int(max_new_tokens),
                                   all_logits=bool(all_logits), layout=layout,
                                   full_rows=full_rows)
    return prefill_jit(params, tokens, lengths, cfg=cfg, policy=policy, chunk=chunk,
                    room=max_new_tokens, all_logits=bool(all_logits), layout=layout,
                    full_rows=full_rows)


def prefill_observed(params, tokens, cfg: ModelConfig, policies, *, lengths=None,
                     chunk_size=None, all_logits: bool = False):
    """Runs the prompts once, keeping every token and what `policies` observe:
    `(logits, cache, observations)`.

    `lcm.cache.compress(cache, policy, observations, cfg)` then gives, for each of `policies`,
    the cache `prefill(..., policy=policy)` would give, without running the prompt again.
    Observations are small except for ObservedAttention / H2O ([L, B, H, T] attention sums).
    """
    lengths = check_prompt(tokens, cfg, lengths, params=params)
    chunk = check_chunk(chunk_size, cfg)
    if is_prefill_press(policies):
        policies = (policies,)
    for policy in policies:
        check_policy(policy, cfg, tokens.shape[1])
    return prefill_jit(params, tokens, lengths, cfg=cfg, policy=None, chunk=chunk, room=0,
                    all_logits=bool(all_logits), observe=observations_for(policies))


def decode_step(params, cache: KVCache, tokens, cfg: ModelConfig, *, policy=None):
    """Feeds one token per row: tokens [B] int -> (logits float32 [B, vocab], cache).

    The token sits at `cache.next_pos` and is appended to every layer's cache. policy: a decode
    policy (`lcm.cache.Decoding`, `H2O`, ...) that keeps the cache within its budget (it needs
    a uniform cache); without one, only the new entries are written (in place under `jit`).
    A full uniform cache grows (with a warning once) and a full layered or pooled one replaces
    its oldest entries (a sliding window; a warning once): `lcm.cache.kv.make_room`. Size the
    cache with `prefill(..., max_new_tokens=n)` to avoid both. Under `jit` a full head replaces
    its oldest entry.
    """
    check_model(cfg)
    if isinstance(cache, PolicyCache):  # KIVI, Quest, DuoAttention
        if policy is not None:
            raise ValueError(f"policy={policy!r}: decode policies need a KVCache; the "
                             f"{type(cache.policy).__name__} cache keeps its own format")
        return policy_decode_step(params, cache, tokens, cfg)
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache={type(cache).__name__}; expected a KVCache from prefill")
    tokens = check_tokens(tokens, cache.next_pos)
    if cache.num_heads not in (cfg.num_kv_heads, cfg.num_heads) or (
            cache.num_layers != cfg.num_layers):
        raise ValueError(f"cache length shape {cache.length.shape} does not fit cfg (num_layers"
                         f"={cfg.num_layers}, num_kv_heads={cfg.num_kv_heads} or num_heads="
                         f"{cfg.num_heads} for per-query-head caches)")
    if policy is not None and cache.layout != "uniform":
        raise ValueError(f"policy={policy!r} compresses while decoding, which needs a uniform "
                         f"cache; this one is {cache.layout!r}: prefill (or compress) with "
                         f"layout='uniform'")
    if policy is not None:
        cache = with_query_buffer(cache, policy, cfg)
        check_decode_policy(policy, cache)
    if policy is None and cache.queries is None:
        cache = make_room(cache, cfg, 1)
    return decode_step_jit(params, cache, tokens, cfg=cfg, policy=policy)


# ---------------------------------------------------------------------------- implementations

@functools.partial(jax.jit, static_argnames=("cfg", "policy", "chunk", "room", "all_logits",
                                             "observe", "layout", "full_rows"))
def prefill_jit(params, tokens, lengths, *, cfg, policy, chunk, room, all_logits, observe=None,
             layout="compact", full_rows=False):
    """full_rows: no row is padded (a layered cache then sizes layers for the prompt length)."""
    # observe: None, or (window, colsum, n_sink) to keep (and return) Observations.
    if owns_cache(policy):  # KIVI, Quest, DuoAttention: their own PolicyCache
        return format_prefill(params, tokens, lengths, cfg=cfg, policy=policy, chunk=chunk,
                              room=room, all_logits=all_logits)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    real = positions < lengths[:, None]
    # Length-dependent RoPE (dynamic, longrope) sees the longest prompt, as transformers would.
    tables = rope_tables(cfg, jnp.max(lengths))
    rotation = "original" if policy is None else policy.positions
    kind = storage(policy, layout)
    plan = window_plan(cfg, policy, T, room, windows=observe is None)
    x = embed(params, tokens, cfg)

    def attention(inputs, xs, carry):
        q, index, lcfg = inputs.q, inputs.index, cfg.layer_config(inputs.kind)
        inv_freq, factor = tables[inputs.kind.rope]
        qr = apply_rope(q, positions, inv_freq, factor)
        kr = apply_rope(inputs.k, positions, inv_freq, factor)
        out = attend(qr, kr, inputs.v, inputs.kind.mask(), impl=cfg.attention.impl,
                     block_q=chunk, block_k=chunk, softcap=cfg.attn_softcap,
                     sinks=inputs.params.get("sinks"))
        entries = prompt_entries(kr, inputs.v, real, lengths)
        kept = {}
        if observe is not None:
            window, colsum, sink = observe
            kept = observe_layer(None, q, qr, kr, real, lengths, chunk=chunk, cfg=lcfg,
                                 window=window, colsum=colsum, sink=sink)
        obs = None
        if plan.pressed(inputs.kind):
            obs = observe_layer(policy, q, qr, kr, real, lengths, chunk=chunk, cfg=lcfg)
        stored = keep_layer(policy, plan, entries, obs, kind=inputs.kind, index=index, cfg=cfg,
                            inv_freq=inv_freq, factor=factor, lengths=lengths, length=T,
                            room=room, storage_kind=kind)
        return out, (stored, kept), carry

    x, (layers, kept), _ = run_layers(x, params["layers"], cfg, attention)
    if all_logits:
        logits = unembed(params, x, cfg)
    else:
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
        logits = unembed(params, last, cfg)[:, 0]
    cache = make_cache(layers, next_pos=lengths, step=jnp.zeros((), jnp.int32),
                       rotation=rotation,
                       slots=plan.slots(layer_slots(policy, kind, T, cfg, room, full_rows),
                                        layout))
    if observe is None:
        return logits, cache
    return logits, cache, Observations(n_sink=observe[2], **kept)


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def decode_step_jit(params, cache, tokens, *, cfg, policy):
    if isinstance(cache, PolicyCache):  # generate's loop with a KIVI / Quest / Duo cache
        return format_decode_step(params, cache, tokens, cfg=cfg)
    if policy is None and cache.queries is None:  # only the new entries are written
        return plain_decode_step(params, cache, tokens, cfg=cfg)
    return mapped_decode_step(params, cache, tokens, cfg=cfg, policy=policy)


def mapped_decode_step(params, cache, tokens, *, cfg, policy):
    """The decode step that maps every layer's entries to new ones (a decode policy may
    compress them): each step writes the whole (uniform) cache anew."""
    position = cache.next_pos
    tables = rope_tables(cfg, jnp.max(position) + 1)
    press_all = presses_every_layer(cfg)
    x = embed(params, tokens[:, None], cfg)
    step = cache.step + 1
    buffered = cache.queries is not None
    query_pos = None
    if buffered:
        query_pos = jnp.concatenate([cache.query_pos[:, 1:], position[:, None]], axis=1)

    def attention(inputs, xs, carry):
        entries, queries = xs
        q, k, v = inputs.q, inputs.k, inputs.v
        inv_freq, factor = tables[inputs.kind.rope]
        lcfg = cfg.layer_config(inputs.kind)
        kr = apply_rope(k, position[:, None], inv_freq, factor)
        stored = kr if cache.rotation == "original" else k
        groups = cache.k.shape[2] // cfg.num_kv_heads  # > 1: one entry set per query head
        stored, v = jnp.repeat(stored, groups, axis=2), jnp.repeat(v, groups, axis=2)
        entries = insert(entries, stored[:, 0], v[:, 0], position)
        q_pos, keys = position[:, None], entries["k"]
        if cache.rotation == "cache":  # rotate by rank in the cache, StreamingLLM style
            q_pos, keys = cache_rotation(entries, inv_freq, factor)
        qr = rotate_queries(q, q_pos, inv_freq, factor)
        vis = cattn.visible(q_pos, entries["pos"] if cache.rotation == "original" else
                            rank_positions(entries), entries_valid(entries),
                            sliding_window=lcfg.sliding_window)
        probs = cattn.attention_probs(qr, keys, vis, softcap=cfg.attn_softcap,
                                      sinks=inputs.params.get("sinks"))
        out = cattn.attend_cache(probs, entries["v"], inputs.h.dtype)
        if buffered:
            queries = jnp.concatenate([queries[:, 1:], q[:, :1].astype(queries.dtype)], 1)
        if policy is not None and (inputs.kind.window is None or press_all):
            # Decode presses compress the global layers (sliding ones keep their window).
            entries = decode_update(policy, entries, probs, step=step, layer=inputs.index,
                                    cfg=lcfg, inv_freq=inv_freq, factor=factor,
                                    position=position, queries=queries, query_pos=query_pos)
        return out, (entries, queries), carry

    x, (layers, queries), _ = run_layers(x, params["layers"], cfg, attention,
                                         xs=(layer_slices(cache), cache.queries))
    logits = unembed(params, x, cfg)[:, 0]
    if policy is not None:
        step = next_step(policy, step)
        if buffered:  # a compression empties the buffer (kvpress clears its hidden states)
            query_pos = jnp.where(step == 0, -1, query_pos)
    return logits, from_layer_slices(cache, layers, next_pos=position + 1, step=step,
                                     queries=queries, query_pos=query_pos)
