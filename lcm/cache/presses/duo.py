"""DuoAttention: retrieval heads keep the full cache, streaming heads keep sinks + a recent window.

DuoAttention (Xiao et al., 2024) learns one gate per (layer, kv head); heads whose gate clears a
threshold are retrieval heads and attend over every token, the others are streaming heads and
attend only to the first `sink_size` tokens and the last `recent_size` ones, in prefill and in
decoding. As in DuoAttention's own code (and unlike kvpress, which keeps every head's full
cache and hides keys by masking), the two kinds live in separate storage: a streaming head holds
sink_size + recent_size entries (the recent ones in a ring buffer), whatever the context length,
so memory really shrinks with the fraction of streaming heads.

The pattern is static (it fixes storage shapes): `head_scores [layers, kv_heads]`, the learned
gates, turned into retrieval heads by `threshold` (score >= threshold, DuoAttention's
deployment) or by `head_compression_ratio` (the round(ratio * L * K) lowest scores stream,
kvpress's rule). Per layer:

    state = duo_prefill(policy.layer_heads(layer), k, v, lengths, capacity=...)
    state = duo_append(state, k_new, v_new)
    out = duo_attention(q, state)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lcm.attention import Causal, SinkWindow, attend
from lcm.cache.masked_read import causal_visibility, masked_attention
from lcm.cache.presses.base import CacheFormat, register
from lcm.checks import check_int, check_number


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class DuoAttention(CacheFormat):
    """Per-(layer, kv-head) retrieval/streaming split. head_scores: [layers, kv_heads] array-like
    (stored as nested tuples so the policy stays hashable and static under `jit`)."""

    head_scores: tuple
    threshold: float | None = 0.5
    head_compression_ratio: float | None = None
    sink_size: int = 128
    recent_size: int = 256

    def __post_init__(self):
        scores = np.asarray(self.head_scores, np.float64)
        if scores.ndim != 2 or scores.size == 0 or not np.isfinite(scores).all():
            raise ValueError(f"DuoAttention(head_scores) has shape {scores.shape}; expected a "
                             f"finite [num_layers, num_kv_heads] array")
        object.__setattr__(self, "head_scores", tuple(map(tuple, scores.tolist())))
        if (self.threshold is None) == (self.head_compression_ratio is None):
            raise ValueError("DuoAttention: pass exactly one of threshold (retrieval iff score "
                             ">= threshold) and head_compression_ratio (that fraction of heads, "
                             "the lowest scores, stream); set threshold=None with a ratio")
        ratio = self.head_compression_ratio
        if ratio is not None:
            check_number("DuoAttention", "head_compression_ratio", ratio, 0.0, 1.0, call=True)
            object.__setattr__(self, "head_compression_ratio", float(ratio))
        for name, minimum in (("sink_size", 0), ("recent_size", 1)):
            check_int("DuoAttention", name, getattr(self, name), minimum, call=True)
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def retrieval(self) -> np.ndarray:
        """bool [layers, kv_heads]: True for retrieval (full cache) heads."""
        scores = np.asarray(self.head_scores)
        if self.threshold is not None:
            return scores >= self.threshold
        n_stream = round(scores.size * self.head_compression_ratio)
        stream = np.zeros(scores.size, bool)
        stream[np.argsort(scores, axis=None, kind="stable")[:n_stream]] = True
        return ~stream.reshape(scores.shape)

    # Layers hold different numbers of retrieval and streaming heads: states differ in shape.
    unrolled = True

    def check_model(self, cfg) -> None:
        shape = np.asarray(self.head_scores).shape
        if shape != (cfg.num_layers, cfg.num_kv_heads):
            raise ValueError(f"DuoAttention head_scores shape {shape}; expected [num_layers, "
                             f"num_kv_heads] = {(cfg.num_layers, cfg.num_kv_heads)}")

    def prefill_attention(self, q, k, v, *, layer, cfg, chunk):
        return duo_prefill_attention(q, k, v, self.layer_heads(layer), impl=cfg.attention.impl,
                                     block=chunk)

    def prefill_state(self, k, v, lengths, *, capacity: int, layer):
        return duo_prefill(self.layer_heads(layer), k, v, lengths, capacity=capacity)

    def decode_layer(self, state, q, k, v, *, layer):
        state = duo_append(state, k, v)
        return duo_attention(q, state), state

    @classmethod
    def example(cls):
        return cls(head_scores=((1.0, 0.0), (0.0, 1.0)), sink_size=1, recent_size=2)

    def layer_heads(self, layer: int) -> DuoHeads:
        r = self.retrieval[layer]
        return DuoHeads(retrieval=tuple(int(i) for i in np.flatnonzero(r)),
                        streaming=tuple(int(i) for i in np.flatnonzero(~r)),
                        sink_size=self.sink_size, recent_size=self.recent_size)


@dataclasses.dataclass(frozen=True)
class DuoHeads:
    """One layer's split: kv-head indices of each kind and the streaming window."""

    retrieval: tuple
    streaming: tuple
    sink_size: int
    recent_size: int

    def query_heads(self, kv_heads, group):
        return np.asarray([h * group + g for h in kv_heads for g in range(group)], np.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DuoState:
    """One layer: full_k, full_v [B, Kr, C, D] (token i at slot i); sink_k, sink_v
    [B, Ks, sink, D]; recent_k, recent_v [B, Ks, recent, D] (token i >= sink at slot
    (i - sink) % recent); length [B] int32."""

    full_k: jax.Array
    full_v: jax.Array
    sink_k: jax.Array
    sink_v: jax.Array
    recent_k: jax.Array
    recent_v: jax.Array
    length: jax.Array
    heads: DuoHeads = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def _recent_tokens(n, sink, recent):
    """[B, recent]: the token each ring slot holds when a row stores n tokens, and validity."""
    lo = jnp.maximum(sink, n - recent)[:, None]
    slots = jnp.arange(recent)[None]
    tokens = lo + (sink + slots - lo) % recent
    return tokens, tokens < n[:, None]


def duo_prefill(heads: DuoHeads, k, v, lengths, *, capacity: int) -> DuoState:
    """k, v [B, T, K, D] (keys after RoPE), right-padded with lengths [B] -> DuoState."""
    B, T, K, D = k.shape
    if capacity < T:
        raise ValueError(f"capacity={capacity} is below the prompt length {T}")
    n = jnp.asarray(lengths, jnp.int32)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    r, s = np.asarray(heads.retrieval, np.int32), np.asarray(heads.streaming, np.int32)
    pad = ((0, 0), (0, 0), (0, capacity - T), (0, 0))
    full_k, full_v = jnp.pad(kt[:, r], pad), jnp.pad(vt[:, r], pad)
    sink = heads.sink_size
    sink_idx = jnp.clip(jnp.arange(sink), 0, T - 1)
    sink_k, sink_v = kt[:, s][:, :, sink_idx], vt[:, s][:, :, sink_idx]
    tokens, _ = _recent_tokens(n, sink, heads.recent_size)
    idx = jnp.clip(tokens, 0, T - 1)[:, None, :, None]
    recent_k = jnp.take_along_axis(kt[:, s], idx, axis=2)
    recent_v = jnp.take_along_axis(vt[:, s], idx, axis=2)
    return DuoState(full_k, full_v, sink_k, sink_v, recent_k, recent_v, n, heads)


def duo_append(state: DuoState, k, v) -> DuoState:
    """Stores one token per row: k, v [B, K, D] (or [B, 1, K, D])."""
    if k.ndim == 4:
        k, v = k[:, 0], v[:, 0]
    heads = state.heads
    r, s = np.asarray(heads.retrieval, np.int32), np.asarray(heads.streaming, np.int32)
    sink, recent = heads.sink_size, heads.recent_size
    n = state.length

    def put(buf, x, slot, write):  # buf [B, Kx, S, D], x [B, Kx, D], slot / write [B]
        if buf.shape[1] == 0 or buf.shape[2] == 0:
            return buf

        def one(b, x, slot, write):
            old = jax.lax.dynamic_slice_in_dim(b, slot, 1, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(
                b, jnp.where(write, x[:, None].astype(b.dtype), old), slot, axis=1)
        return jax.vmap(one)(buf, x, slot, write)

    yes = jnp.ones_like(n, bool)
    full_slot = jnp.clip(n, 0, state.full_k.shape[2] - 1)
    ring = (jnp.maximum(n - sink, 0)) % recent
    return dataclasses.replace(
        state,
        full_k=put(state.full_k, k[:, r], full_slot, yes),
        full_v=put(state.full_v, v[:, r], full_slot, yes),
        sink_k=put(state.sink_k, k[:, s], jnp.minimum(n, max(sink - 1, 0)), n < sink),
        sink_v=put(state.sink_v, v[:, s], jnp.minimum(n, max(sink - 1, 0)), n < sink),
        recent_k=put(state.recent_k, k[:, s], ring, n >= sink),
        recent_v=put(state.recent_v, v[:, s], ring, n >= sink),
        length=n + 1)


def duo_attention(q, state: DuoState, *, scale: float | None = None):
    """Queries of the last T stored tokens, q [B, T, H, D] -> [B, T, H, D]: retrieval heads
    over their full cache, streaming heads over sinks + recent window."""
    B, T, H, D = q.shape
    heads = state.heads
    K = len(heads.retrieval) + len(heads.streaming)
    group = H // K
    n = state.length
    q_pos = n[:, None] - T + jnp.arange(T)[None]
    out = jnp.zeros_like(q)
    if heads.retrieval:
        C = state.full_k.shape[2]
        pos = jnp.broadcast_to(jnp.arange(C), (B, len(heads.retrieval), C))
        vis = causal_visibility(pos, pos < n[:, None, None], q_pos)
        qh = heads.query_heads(heads.retrieval, group)
        o = masked_attention(q[:, :, qh], state.full_k.transpose(0, 2, 1, 3),
                             state.full_v.transpose(0, 2, 1, 3), vis, scale=scale)
        out = out.at[:, :, qh].set(o)
    if heads.streaming:
        Ks, sink = len(heads.streaming), heads.sink_size
        tokens, valid = _recent_tokens(n, sink, heads.recent_size)
        sink_pos = jnp.broadcast_to(jnp.arange(sink), (B, sink))
        pos = jnp.concatenate([sink_pos, tokens], 1)
        ok = jnp.concatenate([sink_pos < n[:, None], valid], 1)
        pos, ok = (jnp.broadcast_to(x[:, None], (B, Ks, x.shape[1])) for x in (pos, ok))
        keys = jnp.concatenate([state.sink_k, state.recent_k], 2).transpose(0, 2, 1, 3)
        values = jnp.concatenate([state.sink_v, state.recent_v], 2).transpose(0, 2, 1, 3)
        qh = heads.query_heads(heads.streaming, group)
        o = masked_attention(q[:, :, qh], keys, values, causal_visibility(pos, ok, q_pos),
                             scale=scale)
        out = out.at[:, :, qh].set(o)
    return out


def duo_prefill_attention(q, k, v, heads: DuoHeads, *, impl="auto", block: int = 512):
    """Prefill attention with the split: q [B, T, H, D]; k, v [B, T, K, D] -> [B, T, H, D].
    Retrieval heads are causal; streaming heads see SinkWindow(sink_size, recent_size)."""
    H, K = q.shape[2], k.shape[2]
    group = H // K
    out = jnp.zeros_like(q)
    for kv_heads, mask in ((heads.retrieval, Causal()),
                           (heads.streaming, SinkWindow(heads.sink_size, heads.recent_size))):
        if not kv_heads:
            continue
        qh, kh = heads.query_heads(kv_heads, group), np.asarray(kv_heads, np.int32)
        o = attend(q[:, :, qh], k[:, :, kh], v[:, :, kh], mask, impl=impl, block_q=block,
                   block_k=block)
        out = out.at[:, :, qh].set(o)
    return out
