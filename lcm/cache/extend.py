"""`extend`: several tokens per row appended to a KV cache in one call, with their logits.

    logits, cache = extend(params, cache, tokens, cfg)   # tokens [B, n] -> logits [B, n, V]

What multi-turn cache reuse (a second question against the first turn's cache), chunked
prefill (`prefill(..., prefill_chunk=c)`) and speculative verification (`lcm.cache.speculative`)
need. The n tokens of a row sit at `cache.next_pos`, `next_pos + 1`, ...; `lengths [B]` (default
n) says how many of them are real (right padding is neither written nor counted).

`extend` is n decode steps in one: each new token attends to what `decode_step` would have
shown it, so `extend` of one token equals `decode_step`, and with free slots for all of them
it equals `forward` on the concatenated sequence. A uniform cache without room grows first
(`lcm.cache.kv.make_room`, as `decode_step`). When a head of a layered or pooled cache (or
any cache under `jit`) runs out of slots, each new token replaces the oldest entry, as
`decode_step` does (a sliding window); the tokens before it in the same call still see the
entries it replaces. Each layer writes the new entries in place, then reads its entries once
for all n queries (blockwise, `lcm.cache.attention.cache_attention`).

Every `KVCache` layout is accepted: uniform, layered (PyramidKV, kept sliding windows) and
pooled (AdaKV; its heads share a pool, so its tokens are written one after another). A cache
of a press (`prefill(..., policy=SnapKV(0.5))`) is extended as it is: the new tokens are kept,
nothing is compressed. Decode-time presses and the formats that keep their own cache (KIVI,
Quest, DuoAttention, the Self-Extend cache) are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcm.cache import attention as cattn
from lcm.cache.checks import check_model, check_row_lengths
from lcm.cache.kv import KVCache, make_room, rotate_heads
from lcm.cache.layouts import pooled_attention, pooled_visible, window_runs, write_pooled
from lcm.cache.step import MAX_RUNS, rotate_queries
from lcm.config import ModelConfig
from lcm.model import check_params, check_token_ids, embed, rope_tables, run_layers, unembed
from lcm.positions import apply_rope

FIELDS = ("k", "v", "pos", "length", "head", "score")


def extend(params, cache: KVCache, tokens, cfg: ModelConfig, *, lengths=None,
           all_logits: bool = True):
    """Appends tokens [B, n] to `cache`: `(logits float32 [B, n, vocab], cache)`.

    lengths [B] int in [0, n]: the real tokens of each row (default n); a row's padding is not
    written and its logits there are meaningless. all_logits=False returns only each row's
    last real token's logits [B, vocab]. See the module docstring for what each token sees.
    """
    check_extend(params, cache, cfg)
    tokens, counts = check_new_tokens(tokens, cache, cfg, lengths)
    cache = make_room(cache, cfg, tokens.shape[1])
    return extend_jit(params, cache, tokens, counts, cfg=cfg,
                      logits="all" if all_logits else "last")


def check_extend(params, cache, cfg) -> None:
    """Raises ValueError unless `cache` is a KVCache `extend` can append to for `cfg`."""
    check_model(cfg)
    check_params(params, cfg)
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache={type(cache).__name__}; extend needs a KVCache (from prefill "
                         f"without a press, or with an eviction press; KIVI, Quest, "
                         f"DuoAttention and the Self-Extend cache keep their own format)")
    if cache.queries is not None:
        raise ValueError("cache holds a decode policy's query buffer; extend appends without "
                         "decode-time compression: use decode_step(..., policy=...) for it")
    if cache.num_layers != cfg.num_layers or cache.num_heads not in (
            cfg.num_kv_heads, cfg.num_heads):
        raise ValueError(f"cache length shape {cache.length.shape} does not fit cfg (num_layers"
                         f"={cfg.num_layers}, num_kv_heads={cfg.num_kv_heads} or num_heads="
                         f"{cfg.num_heads} for per-query-head caches)")
    if cache.head is not None and cache.rotation != "original":
        raise ValueError("a pooled cache with rotation='cache' cannot be extended")


def check_new_tokens(tokens, cache, cfg, lengths):
    """tokens int [B, n] for the cache's batch, lengths [B] in [0, n] -> (int32 tokens, counts
    int32 [B])."""
    tokens = jnp.asarray(tokens)
    B = cache.next_pos.shape[0]
    if tokens.ndim != 2 or tokens.shape[0] != B or tokens.shape[1] == 0 or not jnp.issubdtype(
            tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: shape {tokens.shape}, dtype {tokens.dtype}; expected int "
                         f"[batch={B}, n >= 1]")
    counts = check_row_lengths(lengths, B, tokens.shape[1], minimum=0)
    check_token_ids(tokens, cfg.vocab_size, lengths=None if lengths is None else counts)
    return tokens.astype(jnp.int32), counts


def extend_layers(params, cache, tokens, counts, *, cfg, logits="all", rope_length=None,
                  observe=None, seen=None):
    """`extend` traced: logits "all" [B, n, V], "last" [B, V] or "none" (None returned).
    rope_length: the length length-dependent RoPE tables cover (default the longest row after
    the call; chunked prefill passes the whole prompt's, as one-shot prefill uses).
    observe(seen, layer, aux) -> seen: called in each layer of a uniform cache with that
    layer's slice of `seen` (stacked per layer) and what the attention computed (`aux` of
    `extend_entries`); the updated `seen` is returned as a third output."""
    B, n = tokens.shape
    start = cache.next_pos
    positions = start[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
    if rope_length is None:
        rope_length = jnp.max(start + counts)
    tables = rope_tables(cfg, rope_length)
    x = embed(params, tokens, cfg)
    store = {f: getattr(cache, f) for f in FIELDS if getattr(cache, f) is not None}
    groups = cache.num_heads // cfg.num_kv_heads
    rotation = cache.rotation

    def new_keys(inputs):  # [B, heads of the cache, n, D] as stored, and values
        inv_freq, factor = tables[inputs.kind.rope]
        k = inputs.k if rotation == "cache" else apply_rope(inputs.k, positions, inv_freq,
                                                            factor)
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(inputs.v, groups, axis=2)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def run(store, view, scatter, own, size, inputs, aux=False):
        k, v = new_keys(inputs)
        return extend_entries(
            store, view, scatter, own, size, inputs.q, k, v, positions, counts,
            rotation=rotation, table=tables[inputs.kind.rope],
            window=cfg.layer_config(inputs.kind).sliding_window, softcap=cfg.attn_softcap,
            sinks=inputs.params.get("sinks"), block=cfg.attention.block_k, aux=aux)

    if cache.layer_slots is not None:  # runs of layers, each read through one window
        for first, count, window, xs in window_runs(cache, MAX_RUNS):

            def attention(inputs, xs, store, window=window):
                begin, size = xs
                N = store["pos"].shape[-1]
                ws = jnp.minimum(begin, N - window)  # the window's first slot
                off = begin - ws
                j = jnp.arange(window, dtype=jnp.int32)
                own = (j >= off) & (j < off + size)

                def view(store, name):
                    if name == "length":
                        return store["length"][inputs.index]
                    return jax.lax.dynamic_slice_in_dim(store[name], ws, window, axis=2)

                def scatter(store, writes):
                    at = jnp.where(writes["at"] < window, ws + writes["at"], N)  # N: dropped
                    return write(store, inputs.index, dict(writes, at=at), layer_axis=False)

                out, store = run(store, view, scatter, own, size, inputs)
                return out, None, store

            x, _, store = run_layers(
                x, jax.tree.map(lambda a: a[first:first + count], params["layers"]), cfg,
                attention, xs=xs, carry=store, first=first)
    elif cache.head is not None:  # pooled: the heads share a pool, tokens go one by one
        def attention(inputs, xs, store):
            out, layer = extend_pooled(
                {f: store[f][inputs.index][None] for f in store}, inputs, positions, counts,
                table=tables[inputs.kind.rope],
                window=cfg.layer_config(inputs.kind).sliding_window, softcap=cfg.attn_softcap)
            return out, None, {f: store[f].at[inputs.index].set(layer[f][0]) for f in store}

        x, _, store = run_layers(x, params["layers"], cfg, attention, carry=store)
    else:
        C = cache.k.shape[3]

        def attention(inputs, xs, store):
            def view(store, name):
                return store[name][inputs.index]

            def scatter(store, writes):
                return write(store, inputs.index, writes, layer_axis=True)

            own = jnp.ones((C,), bool)
            if observe is None:
                out, store = run(store, view, scatter, own, C, inputs)
            else:
                out, store, aux = run(store, view, scatter, own, C, inputs, aux=True)
                xs = observe(xs, inputs, aux)
            return out, xs, store

        x, seen, store = run_layers(x, params["layers"], cfg, attention, xs=seen, carry=store)
    cache = cache.replace(next_pos=start + counts, **store)
    if logits == "none":
        out = None
    elif logits == "last":
        last = jnp.take_along_axis(x, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)
        out = unembed(params, last, cfg)[:, 0]
    else:
        out = unembed(params, x, cfg)
    return (out, cache) if observe is None else (out, cache, seen)


extend_jit = jax.jit(extend_layers, static_argnames=("cfg", "logits"))


def extend_entries(store, view, scatter, own, size, q, k, v, positions, counts, *, rotation,
                   table, window, softcap, sinks, block, aux=False):
    """One layer: the n new entries written into the cache, then the attention of the n new
    queries. Returns (out [B, n, H, D], store[, aux]).

    store: the cache arrays; view(store, name) -> the layer's slots read (k, v [B, K, C, D],
    pos [B, K, C]; "length" [B, K]); scatter(store, writes) -> store with {at [B, K, n]: the
    view slot of each new entry (C where it is not written), k, v, pos, length} written.
    own [C] bool: the layer's own slots among the view's (all for a uniform cache), `size` of
    them (static or traced). q [B, n, H, D] un-rotated; k, v [B, K, n, D] the new entries as
    stored; positions [B, n]; counts [B] real new tokens per row; block: old slots read at a
    time (`cache_attention`).

    A head's slots are filled in the order `decode_step` fills them: free slots first, then the
    oldest entries (a ring over the slots in age order); query j sees an old entry until token
    j overwrites it, and the new tokens j' <= j that no later token j'' <= j has overwritten.
    The entries are written before the layer is read, as `decode_step` does, so that XLA
    updates the cache in place: the old entries the call overwrites are gathered first (n per
    head) and attended from there. aux=True adds, for observers, {qr: the rotated queries,
    keys [B, K, C + n, D] and vis [B, K, n, C + n] (the layer's slots before the call, then the
    new tokens), at [B, K, n]}.
    """
    B, K, n, _ = k.shape
    pos = view(store, "pos")
    C = pos.shape[-1]
    length = view(store, "length")
    slot = jnp.arange(C, dtype=jnp.int32)[None, None]
    own = own[None, None]
    first = jnp.argmax(own).astype(jnp.int32)  # the layer's first slot in the view
    held = own & (slot < first + length[..., None])
    j = jnp.arange(n, dtype=jnp.int32)
    real = j[None] < counts[:, None]  # [B, n]

    # Without overflow token j goes to slot first + length + j and every old entry stays
    # visible; otherwise the slots are taken in age order (a sort, as decode_step's argmin).
    # StreamingLLM's rotation needs every entry's age anyway: sort once, outside the cond.
    ordered = age_order(pos, held, own, C) if rotation == "cache" else None
    age = None if ordered is None else ordered[1]

    def ring(_):
        order, age = ordered or age_order(pos, held, own, C)
        at = jnp.take_along_axis(order, (length[..., None] + j[None, None]) % size, axis=-1)
        return at, (size - length)[..., None] + age  # an old entry lives until that token
    def no_ring(_):
        return first + length[..., None] + j[None, None], jnp.full((B, K, C), n, jnp.int32)
    overflow = jnp.any(length + counts[:, None] > size)
    ring_at, lives = jax.lax.cond(overflow, ring, no_ring, None)
    write_it = (real & (j[None] >= counts[:, None] - size))[:, None]  # the last `size` survive
    at = jnp.where(write_it, ring_at, C)  # C: dropped

    # The old entries the writes replace ([B, K, n], at their slots; dropped ones read slot 0).
    def gather(x):
        idx = jnp.minimum(at, C - 1)
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)
    gone = {"k": gather(view(store, "k")), "v": gather(view(store, "v")), "pos": gather(pos),
            "held": gather(held) & (at < C), "lives": gather(lives)}
    if age is not None:
        gone["age"] = gather(age)
    old = None
    if aux:  # the layer as it was, for observers
        old = {"k": view(store, "k"), "v": view(store, "v")}
    never = at < 0  # always false, but only known at run time: it orders the gathers first
    store = scatter(store, {
        "at": at, "k": jnp.where(never[..., None], gone["k"], k),
        "v": jnp.where(never[..., None], gone["v"], v),
        "pos": jnp.broadcast_to(positions[:, None], (B, K, n)),
        "length": jnp.minimum(length + counts[:, None], size).astype(jnp.int32)})
    written = jnp.zeros((B, K, C), bool).at[jnp.arange(B)[:, None, None],
                                             jnp.arange(K)[None, :, None], at].set(
                                                 True, mode="drop")

    inv_freq, factor = table
    k_cache = view(store, "k")
    if rotation == "cache":  # StreamingLLM: keys by rank in the cache, queries after them
        k_cache = rotate_heads(k_cache, jnp.where(held, age, 0), inv_freq, factor)
        gone_k = rotate_heads(gone["k"], jnp.where(gone["held"], gone["age"], 0), inv_freq,
                              factor)
        new_rank = length[..., None] + j[None, None]  # [B, K, n]
        new_k = rotate_heads(k, new_rank, inv_freq, factor)
        qr = rotate_queries(q, new_rank, inv_freq, factor)
    else:
        gone_k, new_k = gone["k"], k
        qr = apply_rope(q, positions, inv_freq, factor)

    def in_window(k_pos):  # [B, K, m] key positions -> [B, K, n, m]
        if window is None:
            return True
        return k_pos[:, :, None] > positions[:, None, :, None] - window

    # What each query sees: old entries that survive the call (the slots not written) ...
    def see_cache(lo, width):
        def cut(x):
            return jax.lax.dynamic_slice_in_dim(x, lo, width, axis=2)
        return (cut(held) & ~cut(written))[:, :, None] & in_window(cut(pos))
    # ... the old entries the call overwrites, until overwritten ...
    see_gone = gone["held"][:, :, None] & (j[None, None, :, None] < gone["lives"][:, :, None]) & (
        in_window(gone["pos"]))
    # ... and the new tokens j' <= j that no later token j'' <= j overwrote.
    see_new = ((j[None, :] <= j[:, None]) & (j[:, None] - j[None, :] < size))[None, None] & (
        real[:, None, None, :]) & in_window(jnp.broadcast_to(positions[:, None], (B, K, n)))
    see_new = jnp.broadcast_to(see_new, (B, K, n, n))
    out = cattn.cache_attention(qr, k_cache, view(store, "v"), see_cache,
                          [(gone_k, gone["v"], see_gone), (new_k, v, see_new)],
                          softcap=softcap, sinks=sinks, block=block)
    if aux:
        before = held[:, :, None] & (j[None, None, :, None] < lives[:, :, None]) & in_window(pos)
        return out, store, {"qr": qr, "keys": jnp.concatenate([old["k"], new_k], 2),
                            "vis": jnp.concatenate([before, see_new], -1), "at": at}
    return out, store


def age_order(pos, held, own, C):
    """(order [B, K, C]: slots in age order (held entries by position, then the free own
    slots, then the rest), age [B, K, C]: each slot's place in that order)."""
    big = jnp.iinfo(jnp.int32).max
    slot = jnp.arange(C, dtype=jnp.int32)[None, None]
    key = jnp.where(held, pos, jnp.where(own, big - C + slot, big))
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.argsort(order, axis=-1).astype(jnp.int32)


def write(store, layer, writes, *, layer_axis: bool):
    """Scatters `extend_entries`' writes into the cache arrays in place: {k, v [L, B, K, C, D],
    pos[, score] [L, B, K, C]} (layer_axis) or a layered cache's {k, v [B, K, N, D], ...} with
    `at` already in its slot numbering; length [L, B, K] either way."""
    B, K, n = writes["at"].shape
    b, h = jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None]
    index = (layer, b, h, writes["at"]) if layer_axis else (b, h, writes["at"])
    out = dict(store, length=store["length"].at[layer].set(writes["length"]))
    for name in ("k", "v", "pos"):
        out[name] = store[name].at[index].set(writes[name].astype(store[name].dtype),
                                              mode="drop")
    if "score" in store:  # a new entry starts with no accumulated attention
        out["score"] = store["score"].at[index].set(0.0, mode="drop")
    return out


def extend_pooled(layer, inputs, positions, counts, *, table, window, softcap):
    """One pooled layer ({k, v [1, B, P, D], pos, head [1, B, P], length [1, B, K]}), its
    tokens written and attended one after another as `decode_step` does: (out, layer)."""
    inv_freq, factor = table
    qr = apply_rope(inputs.q, positions, inv_freq, factor)
    kr = apply_rope(inputs.k, positions, inv_freq, factor)
    sinks = inputs.params.get("sinks")
    n = qr.shape[1]

    def one(i, state):
        layer, out = state
        new, entries = write_pooled(layer, 0, kr[:, i], inputs.v[:, i], positions[:, i])
        active = i < counts  # [B]
        layer = {f: jnp.where(active.reshape((1, -1) + (1,) * (new[f].ndim - 2)), new[f],
                              layer[f]) for f in layer}
        vis = pooled_visible(entries, positions[:, i], sliding_window=window)
        q_i = jax.lax.dynamic_slice_in_dim(qr, i, 1, axis=1)
        o = pooled_attention(q_i, entries["k"], entries["v"], vis, softcap=softcap, sinks=sinks)
        return layer, jax.lax.dynamic_update_slice_in_dim(out, o, i, axis=1)

    out = jnp.zeros(qr.shape, inputs.q.dtype)
    layer, out = jax.lax.fori_loop(0, n, one, (layer, out))
    return out, layer
