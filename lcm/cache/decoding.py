"""Compression while decoding, inside `decode_step` (so inside one jitted scan).

- `Decoding(base_press, compression_interval, target_size, hidden_states_buffer_size)`
  (kvpress's DecodingPress): every `compression_interval` steps each head is compressed back
  to `target_size` entries with the base policy's scores. Attention scorers observe the
  queries decoded since the last compression, at most the last hidden_states_buffer_size + 1
  of them, kept in the cache's query buffer (un-rotated, [L, B, W, H, D]), as kvpress buffers
  hidden states; SnapKV's window is the last `window_size` of them (kvpress asserts the buffer
  is longer than the window; here a shorter buffer is a shorter window). Each scorer keeps
  its prefill definition over those queries, each at its own position: what kvpress 0.5.5's
  scorers compute when given position-correct inputs (tests/cache/test_decoding_parity.py).
  kvpress itself keeps compressed caches in score order (SnapKV then pools over score-order
  neighbours), rotates SnapKV's buffered queries at the newest position, scores
  ObservedAttention by the current query alone divided by (length - slot), and averages
  ExpectedAttention's RoPE from the buffer length instead of the next position.
  A per-query-head base press (gqa="query_head") first gives each query head its own copy of
  its kv head's entries, as prefill does. With `AdaKV(scorer)` as base press the heads of a
  row compete at each compression for heads * target_size entries (each head first keeps its
  safeguard), so each head of the uniform cache has room for the most one head can win
  (`kept_slots`); kvpress keeps the whole cache and masks keys instead.
- `H2O(hh_size, recent_size)`, `TOVA(budget=n)`, `StreamingLLM(budget=n)` update their scores
  at every step (H2O accumulates each step's attention in `cache.score`, TOVA takes the current
  query's attention averaged over heads, StreamingLLM the position) and evict down to their
  budget whenever a head holds more; the cache needs one slot beyond the budget for the
  incoming token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcm.cache import attention as cattn
from lcm.cache.compress import compress_layer
from lcm.cache.kv import KVCache, entries_valid, gather_entries, pad_capacity
from lcm.cache.presses.base import Press, select
from lcm.positions import apply_rope

f32 = jnp.float32


def check_decode_press(policy):
    """Raises ValueError unless `policy` is a decode-time press with what it needs (a stepwise
    press: a token budget); returns its decode_kind. Needs no cache."""
    kind = policy.decode_kind if isinstance(policy, Press) else None
    if kind is None:
        raise ValueError(f"decode policy={policy!r}; expected Decoding(...), H2O, "
                         f"TOVA(budget=n) or StreamingLLM(budget=n) (a press with decode_kind "
                         f"set)")
    if kind == "stepwise" and policy.decode_budget() is None:
        raise ValueError(f"decode policy {policy!r} needs a token budget (budget=n)")
    return kind


def check_decode_policy(policy, cache: KVCache):
    """Raises ValueError unless `policy` can run on `cache` at decode time; returns it."""
    kind = check_decode_press(policy)
    if kind == "periodic":
        policy.check_decode(cache)
        return policy
    if kind == "stepwise":
        n = policy.decode_budget()
        if cache.rotation == "cache" and policy.needs().anything:
            raise ValueError(f"decode policy {type(policy).__name__} needs original positions;"
                             f" the cache has rotation='cache'")
        longest = n
        if not isinstance(cache.length, jax.core.Tracer):  # a concrete cache: its own lengths
            longest = max(longest, int(jnp.max(cache.length)))
        if cache.capacity < longest + 1:
            raise ValueError(f"cache.capacity={cache.capacity}; {type(policy).__name__} keeps "
                             f"{n} entries (the cache holds up to {longest}) and needs one more "
                             f"slot for the incoming token: prefill with a larger "
                             f"max_new_tokens")
        if policy.accumulates_scores and cache.score is None:
            raise ValueError(f"{type(policy).__name__} decoding needs score accumulators: "
                             f"prefill with policy={type(policy).__name__}(...) (or a cache "
                             f"built with scores=True)")
    return policy


def decode_room(decode_policy, policy, prompt_kept: int, max_new_tokens: int,
                num_heads: int) -> int:
    """Free slots `generate` gives the prefill cache for `decode_policy` (prompt_kept: slots
    the prefill policy keeps; num_heads: the cache's heads)."""
    if decode_policy.decode_kind == "periodic":
        return decode_policy.decode_room(prompt_kept, max_new_tokens, num_heads)
    return max(decode_policy.decode_budget() + 1 - prompt_kept, 1)


def buffer_size(policy) -> int:
    """Queries a decode policy buffers between compressions (0: none)."""
    return policy.buffer_size() if policy.decode_kind == "periodic" else 0


def with_query_buffer(cache: KVCache, policy, cfg) -> KVCache:
    """The cache made ready for `policy`: an empty query buffer sized for it (unchanged when it
    has one) and, for a per-query-head policy on a cache of kv heads, one entry set per query
    head (each kv head's entries repeated for its group, as prefill does for such a policy), so
    that query heads select their own entries instead of voting by the group's mean."""
    if policy.per_query_head and cfg.group_size > 1 and cache.length.shape[2] == (
            cfg.num_kv_heads):
        cache = cache.replace(**{
            name: jnp.repeat(getattr(cache, name), cfg.group_size, axis=2)
            for name in ("k", "v", "pos", "length", "score") if getattr(cache, name) is not None})
    size = buffer_size(policy)
    if size == 0 or (cache.queries is not None and cache.queries.shape[2] == size):
        return cache
    L, B = cache.num_layers, cache.next_pos.shape[0]
    return cache.replace(
        queries=jnp.zeros((L, B, size, cfg.num_heads, cfg.head_dim), cache.k.dtype),
        query_pos=jnp.full((B, size), -1, jnp.int32))


def push_query(queries, query_pos, q, position):
    """Appends q [B, H, D] (un-rotated) at `position` [B] to one layer's buffer [B, W, H, D]
    (positions [B, W]), dropping the oldest."""
    queries = jnp.concatenate([queries[:, 1:], q[:, None].astype(queries.dtype)], axis=1)
    query_pos = jnp.concatenate([query_pos[:, 1:], position[:, None]], axis=1)
    return queries, query_pos


def decode_update(policy, entries, probs, *, step, layer, cfg, inv_freq, factor, position,
                  queries=None, query_pos=None):
    """One layer's cache after a decode step's attention (probs [B, K, G, 1, C]), compressed
    when the policy says so."""
    C = entries["pos"].shape[-1]
    valid = entries_valid(entries)
    if policy.decode_kind == "stepwise":
        n = policy.decode_budget()
        scores, entries = policy.step_scores(entries, probs, position, valid)

        def evict(entries):
            idx, keep = select(scores, jnp.minimum(entries["length"], n), C)
            return pad_capacity(gather_entries(entries, idx, keep), C)

        over = jnp.any(entries["length"] > n)
        return jax.lax.cond(over, evict, lambda e: e, entries)

    def compress(entries):
        obs = _observations(policy, entries, queries, query_pos, inv_freq, factor, cfg)
        out = compress_layer(policy.base_press, entries, obs, layer=layer, cfg=cfg,
                             inv_freq=inv_freq, factor=factor, next_pos=position + 1,
                             target=policy.target_size)
        return pad_capacity(out, C)

    return jax.lax.cond(step >= policy.compression_interval, compress, lambda e: e, entries)


def _observations(policy, entries, queries, query_pos, inv_freq, factor, cfg):
    """What the base press observes, from the buffered queries of the steps since the last
    compression."""
    window, colsum, sink = policy.base_press.needs()
    obs = {}
    if queries is None:
        return obs
    qr = apply_rope(queries, jnp.maximum(query_pos, 0), inv_freq, factor)
    if window:
        obs["q_win"], obs["q_pos"] = qr, query_pos
    if colsum:
        vis = cattn.visible(query_pos, entries["pos"], entries_valid(entries),
                            sliding_window=cfg.sliding_window)
        probs = cattn.attention_probs(qr, entries["k"], vis)  # [B, K, G, W, C]
        B, K, G, W, C = probs.shape
        obs["colsum"] = probs.sum(3).reshape(B, K * G, C)
        obs["seen_by"] = vis.sum(2).astype(f32)  # [B, K, C]
    if sink is not None:
        real = (query_pos >= 0)[:, :, None, None]
        count = jnp.maximum(real.sum(1), 1).astype(f32)  # [B, 1, 1]
        qf = jnp.where(real, queries.astype(f32), 0.0)
        mean = qf.sum(1) / count
        centered = jnp.where(real, qf - mean[:, None], 0.0)
        obs["q_mean"] = mean
        obs["q_cov"] = jnp.einsum("bthi,bthj->bhij", centered, centered) / count[..., None]
    return obs


def next_step(policy, step):
    """The step counter after a decode step (a periodic policy resets it when it compressed)."""
    return policy.next_step(step) if policy.decode_kind == "periodic" else step

