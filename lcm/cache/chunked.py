"""Chunked prefill: the prompt run `prefill_chunk` tokens at a time against the growing cache.

`prefill(..., prefill_chunk=c)` feeds the prompt to `lcm.cache.extend` one chunk after another
inside one `lax.scan`, so a layer's activations are [B, c, hidden] (and its attention weights
[c, block]: the cache is read blockwise) instead of [B, T, hidden]; the cache is the only thing
that grows with the prompt. Without a press the logits and the cache equal the one-shot
prefill's.

With a press, every token is kept while the chunks run, and what the press observes is
gathered chunk by chunk (the last window of rotated queries, attention summed over all
queries, the queries' mean and covariance); the cache is compressed once at the end, exactly
as the one-shot prefill compresses it (`prefill_observed` + `compress`), so the result equals
the one-shot prefill's. Peak memory is then the full cache plus one chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lcm.cache import attention as cattn
from lcm.cache.compress import Observations, compress_jit, observations_for, window_plan
from lcm.cache.extend import extend_layers
from lcm.cache.layouts import make_cache

f32 = jnp.float32


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "chunk", "room", "all_logits",
                                             "layout", "full_rows"))
def chunked_prefill_jit(params, tokens, lengths, *, cfg, policy, chunk, room, all_logits,
                        layout, full_rows):
    """`prefill` chunk by chunk; the arguments are `prefill_jit`'s (chunk: prefill_chunk)."""
    B, T = tokens.shape
    n = -(-T // chunk)
    tokens = jnp.pad(tokens, ((0, 0), (0, n * chunk - T)))
    rope_length = jnp.max(lengths)
    observe, seen = None, None
    if policy is None:
        plan = window_plan(cfg, None, T, room)
        cache = empty_cache(cfg, B, T + room, plan.slots(None, layout))
    else:
        cache = empty_cache(cfg, B, T, None)
        needs = observations_for((policy,))
        seen = empty_observations(cfg, B, T, *needs)
        observe = functools.partial(observe_chunk, needs=needs, cfg=cfg)

    def body(state, i):
        cache, last, seen = state
        counts = jnp.clip(lengths - i * chunk, 0, chunk).astype(jnp.int32)
        piece = jax.lax.dynamic_slice_in_dim(tokens, i * chunk, chunk, axis=1)
        out = extend_layers(params, cache, piece, counts, cfg=cfg,
                            logits="all" if all_logits else "last", rope_length=rope_length,
                            observe=observe, seen=seen)
        logits, cache = out[:2]
        if observe is not None:
            seen = out[2]
        if all_logits:
            return (cache, last, seen), logits
        here = (counts > 0) & (lengths <= (i + 1) * chunk)  # the row's last token is here
        return (cache, jnp.where(here[:, None], logits, last), seen), None

    last = jnp.zeros((B, cfg.vocab_size), f32)
    (cache, last, seen), chunks = jax.lax.scan(body, (cache, last, seen), jnp.arange(n))
    logits = last if not all_logits else chunks.transpose(1, 0, 2, 3).reshape(
        B, n * chunk, -1)[:, :T]
    if policy is not None:
        cache = compress_jit(cache, policy, finish_observations(seen, needs), cfg=cfg, room=room,
                          layout=layout, full_rows=full_rows)
    return logits, cache


def empty_cache(cfg, batch: int, capacity: int, slots):
    """A KVCache with no entries, `capacity` slots per head (`slots`: per-layer capacities)."""
    L, K, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    shape = (L, batch, K, capacity)
    stacked = {"k": jnp.zeros(shape + (D,), cfg.compute_dtype),
               "v": jnp.zeros(shape + (D,), cfg.compute_dtype),
               "pos": jnp.full(shape, -1, jnp.int32),
               "length": jnp.zeros((L, batch, K), jnp.int32)}
    return make_cache(stacked, next_pos=jnp.zeros((batch,), jnp.int32),
                      step=jnp.zeros((), jnp.int32), rotation="original", slots=slots)


# --------------------------------------------------------------------- observations ("end")

def empty_observations(cfg, batch: int, length: int, window: int, colsum: bool, sink):
    L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
    seen = {}
    if window:
        seen["q_win"] = jnp.zeros((L, batch, window, H, D), cfg.compute_dtype)
        seen["q_pos"] = jnp.full((L, batch, window), -1, jnp.int32)
    if colsum:
        seen["colsum"] = jnp.zeros((L, batch, H, length), f32)
    if sink is not None:
        seen["count"] = jnp.zeros((L, batch), f32)
        seen["q_sum"] = jnp.zeros((L, batch, H, D), f32)
        seen["q_outer"] = jnp.zeros((L, batch, H, D, D), f32)
    return seen


def observe_chunk(seen, inputs, aux, *, needs, cfg):
    """One layer's observations after one chunk (`extend_layers`'s observe hook). The cache
    is the uncompressed one of this prefill, so a slot's index is its entry's position."""
    window, colsum, sink = needs
    qr, at = aux["qr"], aux["at"][:, 0]  # [B, c, H, D]; [B, c] (every kv head alike)
    B, c, H, D = qr.shape
    C = seen["colsum"].shape[-1] if colsum else None
    real = at < aux["vis"].shape[-1] - c  # written (a real token of the row)
    positions = jnp.where(real, at, -1)
    counts = real.sum(-1)
    seen = dict(seen)
    if window:
        W = seen["q_pos"].shape[-1]
        q_all = jnp.concatenate([seen["q_win"], qr.astype(seen["q_win"].dtype)], axis=1)
        pos_all = jnp.concatenate([seen["q_pos"], positions], axis=1)
        idx = counts[:, None] + jnp.arange(W, dtype=jnp.int32)[None]  # the newest W
        seen["q_win"] = jnp.take_along_axis(q_all, idx[:, :, None, None], axis=1)
        seen["q_pos"] = jnp.take_along_axis(pos_all, idx, axis=1)
    if colsum:  # as column_sums: plain softmax weights (no soft-cap, no sinks), real queries
        probs = cattn.attention_probs(qr, aux["keys"], aux["vis"])  # [B, K, G, c, C + c]
        probs = jnp.where(real[:, None, None, :, None], probs, 0.0).sum(3).reshape(B, H, -1)
        onehot = (at[:, :, None] == jnp.arange(C, dtype=jnp.int32)[None, None]).astype(f32)
        seen["colsum"] = seen["colsum"] + probs[..., :C] + jnp.einsum(
            "bhj,bjc->bhc", probs[..., C:], onehot)
    if sink is not None:
        use = real & (positions >= sink)
        qf = jnp.where(use[:, :, None, None], inputs.q.astype(f32), 0.0)
        seen["count"] = seen["count"] + use.sum(-1).astype(f32)
        seen["q_sum"] = seen["q_sum"] + qf.sum(1)
        seen["q_outer"] = seen["q_outer"] + jnp.einsum("bthi,bthj->bhij", qf, qf)
    return seen


def finish_observations(seen, needs) -> Observations:
    """The Observations of a whole prompt from the chunks' running sums."""
    window, colsum, sink = needs
    out = {}
    if window:
        out["q_win"], out["q_pos"] = seen["q_win"], seen["q_pos"]
    if colsum:
        out["colsum"] = seen["colsum"]
    if sink is not None:
        count = jnp.maximum(seen["count"], 1.0)[..., None, None]
        mean = seen["q_sum"] / count
        out["q_mean"] = mean
        out["q_cov"] = seen["q_outer"] / count[..., None] - jnp.einsum("lbhi,lbhj->lbhij",
                                                                        mean, mean)
    return Observations(n_sink=sink, **out)

