"""The decode step without a decode-time policy, for every `KVCache` layout.

The cache arrays are the loop carry, and each layer writes its new entry in place (a scatter of
one slot per head), then reads its own slice for attention. The decode-policy step
(`lcm.cache.prefill.decode_step_jit` with a policy) instead maps layers to new layers, which
makes XLA copy the whole cache at every step; without a policy nothing but the new entries
changes, so nothing else is written.

Uniform and pooled caches run the layers under `lax.scan`; a layered cache (a capacity per
layer) runs at most MAX_RUNS scans over runs of consecutive layers, each layer read through a
window of its run's largest capacity (its own slots marked valid).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcm.cache import attention as cattn
from lcm.cache.kv import cache_rotation, entries_valid, rank_positions
from lcm.cache.layouts import (pooled_attention, pooled_visible, window_runs, write_pooled,
                               write_uniform, write_window)
from lcm.model import embed, rope_tables, run_layers, unembed
from lcm.positions import apply_rope

FIELDS = ("k", "v", "pos", "length", "head", "score")
# A layered cache (PyramidKV: a capacity per layer) decodes as at most this many scans, each
# over consecutive layers read through a window of their largest capacity, split to read the
# fewest extra slots: one unrolled layer per capacity compiled slowly (102 s for 30 layers).
MAX_RUNS = 8


def plain_decode_step(params, cache, tokens, *, cfg, max_runs: int = MAX_RUNS):
    """(logits float32 [B, vocab], cache) for tokens [B] at cache.next_pos; traced inside
    `decode_step_jit`'s jit. max_runs: scans of a layered cache (`layer_runs`)."""
    position = cache.next_pos
    tables = rope_tables(cfg, jnp.max(position) + 1)
    x = embed(params, tokens[:, None], cfg)
    store = {n: getattr(cache, n) for n in FIELDS if getattr(cache, n) is not None}
    groups = cache.num_heads // cfg.num_kv_heads  # > 1: one entry set per query head
    softcap, block = cfg.attn_softcap, cfg.attention.block_k

    def entry(inputs):  # the new entry of one layer: k, v [B, heads of the cache, D]
        inv_freq, factor = tables[inputs.kind.rope]
        stored = apply_rope(inputs.k, position[:, None], inv_freq, factor)
        if cache.rotation == "cache":
            stored = inputs.k
        stored = jnp.repeat(stored, groups, axis=2)
        return stored[:, 0], jnp.repeat(inputs.v, groups, axis=2)[:, 0]

    def read(inputs, entries):
        q, window = inputs.q, cfg.layer_config(inputs.kind).sliding_window
        inv_freq, factor = tables[inputs.kind.rope]
        if cache.head is not None:
            qr = apply_rope(q, position[:, None], inv_freq, factor)
            vis = pooled_visible(entries, position, sliding_window=window)
            return pooled_attention(qr, entries["k"], entries["v"], vis, softcap=softcap,
                                    sinks=inputs.params.get("sinks"))
        q_pos, keys, k_pos = position[:, None], entries["k"], entries["pos"]
        if cache.rotation == "cache":  # rotate by rank in the cache, StreamingLLM style
            q_pos, keys = cache_rotation(entries, inv_freq, factor)
            k_pos = rank_positions(entries)
        qr = rotate_queries(q, q_pos, inv_freq, factor)
        vis = cattn.visible(q_pos, k_pos, entries_valid(entries), sliding_window=window)

        def see(lo, width):
            return jax.lax.dynamic_slice_in_dim(vis, lo, width, axis=3)
        # read `block` slots at a time: no relayout of the whole layer's keys per step
        return cattn.cache_attention(qr, keys, entries["v"], see, [], softcap=softcap,
                                     sinks=inputs.params.get("sinks"), block=block)

    if cache.layer_slots is not None:  # runs of layers, each scanned through one window
        for first, count, window, xs in window_runs(cache, max_runs):

            def attention(inputs, xs, store, window=window):
                start, size = xs
                k, v = entry(inputs)
                store, entries = write_window(store, inputs.index, start, size, window, k, v,
                                              position)
                return read(inputs, entries), None, store

            x, _, store = run_layers(
                x, jax.tree.map(lambda a: a[first:first + count], params["layers"]), cfg,
                attention, xs=xs, carry=store, first=first)
    else:
        write = write_pooled if cache.head is not None else write_uniform

        def attention(inputs, xs, store):
            k, v = entry(inputs)
            store, entries = write(store, inputs.index, k, v, position)
            return read(inputs, entries), None, store

        x, _, store = run_layers(x, params["layers"], cfg, attention, carry=store)
    logits = unembed(params, x, cfg)[:, 0]
    return logits, cache.replace(next_pos=position + 1, **{n: store[n] for n in store})


def rotate_queries(q, q_pos, inv_freq, factor):
    """q [B, n, H, D] rotated at q_pos [B, n] (shared by the heads) or [B, K, n] (one position
    per kv head, shared by the query heads of its group)."""
    if q_pos.ndim == 2:
        return apply_rope(q, q_pos, inv_freq, factor)
    B, n, H, D = q.shape
    K = q_pos.shape[1]
    qg = q.reshape(B, n, K, H // K, D).transpose(0, 2, 1, 3, 4).reshape(B * K, n, H // K, D)
    out = apply_rope(qg, q_pos.reshape(B * K, n), inv_freq, factor)
    return out.reshape(B, K, n, H // K, D).transpose(0, 2, 1, 3, 4).reshape(B, n, H, D)
