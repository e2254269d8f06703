"""Cache layouts whose memory is the policy's budget: per-layer capacities and per-layer pools.

A policy's selection (`lcm.cache.compress`) returns each layer as per-head slots [B, K, cap]
with one static `cap` for every layer and head: the largest budget. Stored that way, a policy
with smaller budgets in some layers (PyramidKV) or heads (AdaKV) saves nothing. Here the
selected entries are re-stored so that the bytes are the sum of the budgets:

- layered (PyramidKV): layer l keeps C_l = its largest budget (+ room) slots per head, and the
  layers sit one after another on the slot axis of one array (`KVCache.layer_slots`);
- pooled (AdaKV): each layer's heads share one pool of K * (budget + room) slots; every entry
  carries its kv head (`KVCache.head`), so a head holds as many entries as it won.

`layout="uniform"` keeps one capacity for everything (what decode-time policies need).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lcm.cache.kv import KVCache, entries_valid

LAYOUTS = ("compact", "uniform")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {list(LAYOUTS)} (compact: memory "
                         f"is the policy's budget; uniform: one capacity for all layers and "
                         f"heads, as decode-time policies need)")
    return layout


def storage(policy, layout: str) -> str:
    """The cache layout `policy` gets: "layered", "pooled" or "uniform"."""
    if layout == "uniform" or policy is None:
        return "uniform"
    return policy.storage(layout)


def pool_layer(entries: dict, kept: int, room: int) -> dict:
    """One layer's per-head entries {k, v [B, K, C, D], pos[, score] [B, K, C], length [B, K]}
    -> a pool of P = K * (kept + room) slots: {k, v [B, P, D], pos, head[, score] [B, P],
    length [B, K]}. Each row's entries (at most K * kept of them) come first, head by head."""
    B, K, C = entries["pos"].shape
    valid = entries_valid(entries).reshape(B, K * C)
    order = jnp.argsort(~valid, axis=-1, stable=True)[:, :K * kept]  # entries first
    keep = jnp.take_along_axis(valid, order, -1)
    heads = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32)[:, None], (K, C)).reshape(K * C)

    def take(x, fill):
        x = x.reshape((B, K * C) + x.shape[3:])
        idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
        got = jnp.take_along_axis(x, idx, axis=1)
        got = jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), got, fill)
        widths = [(0, 0), (0, K * room)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(got.astype(x.dtype), widths, constant_values=fill)

    out = {"k": take(entries["k"], 0), "v": take(entries["v"], 0), "pos": take(entries["pos"], -1),
           "head": take(jnp.broadcast_to(heads, (B, K * C)).reshape(B, K, C), -1),
           "length": entries["length"]}
    if "score" in entries:
        out["score"] = take(entries["score"], 0)
    return out


def layered(stacked: dict, slots: tuple) -> dict:
    """Stacked layers {k [L, B, K, C, D], ...} -> one array per field with layer l's first
    slots[l] slots at offset sum(slots[:l]) ({k [B, K, N, D], pos [B, K, N], ...})."""
    out = {"length": stacked["length"]}
    for name, x in stacked.items():
        if name != "length":
            out[name] = jnp.concatenate([x[i, :, :, :n] for i, n in enumerate(slots)], axis=2)
    return out


def make_cache(stacked: dict, *, next_pos, step, rotation, slots=None) -> KVCache:
    """The KVCache of stacked (per-layer) outputs; `slots`: per-layer capacities (layered)."""
    if slots is not None:
        stacked = layered(stacked, slots)
    return KVCache(k=stacked["k"], v=stacked["v"], pos=stacked["pos"], length=stacked["length"],
                   next_pos=next_pos, score=stacked.get("score"), step=step, rotation=rotation,
                   head=stacked.get("head"), layer_slots=None if slots is None else tuple(slots))


# ------------------------------------------------------------------ decoding: writes in place

def write_uniform(store: dict, index, k, v, position) -> tuple[dict, dict]:
    """Appends k, v [B, K, D] at position [B] to layer `index` of stacked arrays {k, v
    [L, B, K, C, D], pos[, score] [L, B, K, C], length [L, B, K]} (a full head overwrites its
    oldest entry). Returns (store, the layer's entries after the write)."""
    entries = {name: store[name][index] for name in ("pos", "length")}
    slot, length = _slots(entries["pos"], entries["length"], entries_valid(entries),
                          entries["pos"].shape[-1])
    B, K = slot.shape
    b, h = jnp.arange(B)[:, None], jnp.arange(K)[None, :]
    store = dict(store, k=store["k"].at[index, b, h, slot].set(k.astype(store["k"].dtype)),
                 v=store["v"].at[index, b, h, slot].set(v.astype(store["v"].dtype)),
                 pos=store["pos"].at[index, b, h, slot].set(
                     jnp.broadcast_to(position[:, None], (B, K))),
                 length=store["length"].at[index].set(length))
    if "score" in store:  # a new entry starts with no accumulated attention (H2O prefill)
        store["score"] = store["score"].at[index, b, h, slot].set(0.0)
    return store, {name: store[name][index] for name in ("k", "v", "pos", "length")}


def write_window(store: dict, layer, start, size, window: int, k, v, position):
    """As `write_uniform` for layer `layer` of a layered cache, whose slots are [start, start +
    size) (traced, so one `lax.scan` serves a run of layers): the layer is read through a
    window of `window` >= size static slots (shifted back at the end of the array), its own
    slots marked by the entries' "valid" mask."""
    N = store["pos"].shape[-1]
    ws = jnp.minimum(start, N - window)  # the window's first slot
    off = start - ws  # the layer's first slot within the window
    length = store["length"][layer]
    j = jnp.arange(window, dtype=jnp.int32)[None, None]
    mine = (j >= off) & (j < off + size)

    def view(x):
        return jax.lax.dynamic_slice_in_dim(x, ws, window, axis=2)

    slot, length = _slots(view(store["pos"]), length, mine & (j < off + length[..., None]),
                          size, first=off)
    at = ws + slot
    B, K = at.shape
    b, h = jnp.arange(B)[:, None], jnp.arange(K)[None, :]
    store = dict(store, k=store["k"].at[b, h, at].set(k.astype(store["k"].dtype)),
                 v=store["v"].at[b, h, at].set(v.astype(store["v"].dtype)),
                 pos=store["pos"].at[b, h, at].set(jnp.broadcast_to(position[:, None], (B, K))),
                 length=store["length"].at[layer].set(length))
    out = {name: view(store[name]) for name in ("k", "v", "pos")}
    return store, dict(out, length=length, valid=mine & (j < off + length[..., None]))


def layer_runs(slots: tuple, max_runs: int) -> tuple:
    """Splits a layered cache's per-layer capacities into at most `max_runs` runs of
    consecutive layers, each read through one window of its largest capacity: ((first layer,
    layers, window), ...), chosen to read the fewest slots beyond the layers' own."""
    L = len(slots)
    runs = min(max_runs, L)
    waste = [[0] * (L + 1) for _ in range(L + 1)]  # waste[i][j]: layers i..j-1 in one run
    for i in range(L):
        for j in range(i + 1, L + 1):
            waste[i][j] = max(slots[i:j]) * (j - i) - sum(slots[i:j])
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(runs + 1)]  # best[r][j]: layers 0..j-1 in r runs
    cut = [[0] * (L + 1) for _ in range(runs + 1)]
    best[0][0] = 0
    for r in range(1, runs + 1):
        for j in range(1, L + 1):
            for i in range(r - 1, j):
                cost = best[r - 1][i] + waste[i][j]
                if cost < best[r][j]:
                    best[r][j], cut[r][j] = cost, i
    r = min(range(1, runs + 1), key=lambda r: (best[r][L], r))  # fewest runs at least waste
    out, j = [], L
    while r:
        i = cut[r][j]
        out.append((i, j - i, max(slots[i:j])))
        j, r = i, r - 1
    return tuple(reversed(out))


def window_runs(cache: KVCache, max_runs: int):
    """The runs of a layered cache (`layer_runs`), each as (first layer, layers, window,
    (first slot of each layer, slots of each layer) int32 arrays: the per-layer inputs of the
    run's scan)."""
    for first, count, window in layer_runs(cache.layer_slots, max_runs):
        layers = range(first, first + count)
        yield first, count, window, (
            jnp.asarray([cache.layer_offset(i) for i in layers], jnp.int32),
            jnp.asarray(cache.layer_slots[first:first + count], jnp.int32))


def _slots(pos, length, valid, size, first=0):
    """Where each head's new entry goes among slots [first, first + size) of pos [B, K, C]:
    slot first + length, or the oldest valid entry's when full; and the new length."""
    big = jnp.iinfo(jnp.int32).max
    oldest = jnp.argmin(jnp.where(valid, pos, big), -1)
    slot = jnp.where(length >= size, oldest, first + length).astype(jnp.int32)
    return slot, jnp.minimum(length + 1, size)


def write_pooled(store: dict, index, k, v, position) -> tuple[dict, dict]:
    """Appends one entry per head, k, v [B, K, D], to the pool of layer `index` ({k, v
    [L, B, P, D], pos, head [L, B, P], length [L, B, K]}) after its entries; when the pool is
    full each head overwrites its own oldest entry (a head with none drops the token)."""
    pos, head, length = store["pos"][index], store["head"][index], store["length"][index]
    B, P = pos.shape
    K = length.shape[-1]
    fill = length.sum(-1)  # [B]
    heads = jnp.arange(K, dtype=jnp.int32)
    append = (fill + K <= P)[:, None]
    big = jnp.iinfo(jnp.int32).max
    mine = ((jnp.arange(P)[None, None] < fill[:, None, None])
            & (head[:, None] == heads[None, :, None]))
    oldest = jnp.argmin(jnp.where(mine, pos[:, None], big), -1).astype(jnp.int32)  # [B, K]
    slot = jnp.where(append, fill[:, None] + heads[None], jnp.where(mine.any(-1), oldest, P))
    b = jnp.arange(B)[:, None]

    def put(x, value):
        return x.at[index, b, slot].set(value.astype(x.dtype), mode="drop")

    store = dict(store, k=put(store["k"], k), v=put(store["v"], v),
                 pos=put(store["pos"], jnp.broadcast_to(position[:, None], (B, K))),
                 head=put(store["head"], jnp.broadcast_to(heads[None], (B, K))),
                 length=store["length"].at[index].set(jnp.where(append, length + 1, length)))
    return store, {name: store[name][index] for name in ("k", "v", "pos", "head", "length")}


def pooled_visible(entries, q_pos, *, sliding_window=None):
    """Bool [B, K, P]: which pool entries kv head k's queries at q_pos [B] see."""
    P = entries["pos"].shape[-1]
    K = entries["length"].shape[-1]
    fill = entries["length"].sum(-1)
    heads = jnp.arange(K, dtype=jnp.int32)[None, :, None]
    kp, qp = entries["pos"][:, None], q_pos[:, None, None]
    vis = ((jnp.arange(P)[None, None] < fill[:, None, None]) & (entries["head"][:, None] == heads)
           & (kp <= qp) & (qp >= 0))
    if sliding_window is not None:
        vis = vis & (kp > qp - sliding_window)
    return vis


def pooled_attention(q, k, v, vis, *, softcap=None, sinks=None):
    """q [B, 1, H, D]; pool k, v [B, P, D]; vis [B, K, P] -> [B, 1, H, D] (float32 softmax;
    a head that sees nothing gives zeros; softcap and sinks, None or [H] sink logits, as
    `lcm.cache.attention.attention_probs`)."""
    B, _, H, D = q.shape
    K = vis.shape[1]
    qg = q.reshape(B, K, H // K, D)
    s = jnp.einsum("bkgd,bpd->bkgp", qg, k, preferred_element_type=jnp.float32) * (
        1.0 / math.sqrt(D))
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(vis[:, :, None], s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    if sinks is not None:
        sink = jnp.asarray(sinks).astype(jnp.float32).reshape(1, K, H // K, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = p.sum(-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgp,bpd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, 1, H, D).astype(q.dtype)
