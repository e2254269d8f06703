"""Retrieved block memory (InfLLM, Xiao et al. 2024), training-free on any loaded model.

Every layer keeps the K/V of the whole document so far in blocks of `block_size` tokens. Each
query block of a segment attends, through the block-sparse path with a layout computed at run
time (`BlockMask` & `Causal`), to: the first `init_blocks` blocks (attention sinks), the
`local_blocks` blocks just before the segment and the segment itself (causal), and the `top_k`
other past blocks whose representative key (the block's mean key, before RoPE) best matches the
block's mean query. Unselected blocks are never computed.

Positions (InfLLM's choice, `clip_positions=True`): keys are stored unrotated; the segment and
the local window keep their true positions, while sink and retrieved blocks are all placed just
before the local window, so no query-key distance exceeds segment + local window + one block
and a model runs far past its training length. With `clip_positions=False` every key keeps its
absolute position (then, with enough `top_k`, this is exactly full causal attention).

Options (see `lcm.memory.events`): `boundaries="surprise"` cuts the store into EM-LLM events
(variable-length blocks of `min_block_size`..`block_size` tokens, where the model's own
next-token surprise jumps) instead of fixed blocks; a query block then sees exactly the tokens
of its chosen events through a token-level runtime mask (`TokenRows`), and sinks and the local
window are counted in tokens (`init_blocks * block_size`, `local_blocks * block_size`).
`repr_tokens=r` scores a block by InfLLM's representative tokens: the mean of its r keys that
received the most attention from the queries of the segments while they sat in the local window
or in the segment itself (summed over each KV head's query heads, since lcm selects blocks per
KV head; InfLLM per query head), instead of the mean of all its keys. The scores need each
query's softmax normaliser, so that option runs one more (forward-only) attention pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcm.attention import BlockMask, Causal, attend, mask_layout
from lcm.attention.blockwise import attention_with_lse
from lcm.checks import is_int
from lcm.memory.base import Memory, default_scale, f32, grouped, key_validity
from lcm.memory.events import (TokenRows, block_representatives, event_starts, last_valid,
                               surprise_of, surprise_threshold)
from lcm.positions import apply_rope

_BOUNDARIES = ("fixed", "surprise")


@dataclasses.dataclass(frozen=True)
class RetrievedBlocks(Memory):
    """InfLLM-style block retrieval over a per-layer store of `capacity` tokens (tokens past it
    are not stored). State "layers": k (unrotated), v [B, layers, capacity, kv_heads, head_dim],
    valid [B, layers, capacity], and with `repr_tokens` score [B, layers, capacity, kv_heads]
    (attention received). With `boundaries="surprise"`, "carried" (shared by the layers): start
    [B, capacity] (the token starts an event), history, history_valid [B, window] (the last
    known surprises), run [B] int32 (the open event's length).

    boundaries: "fixed" (blocks of `block_size`) or "surprise" (EM-LLM events of
    `min_block_size`..`block_size` tokens; `surprise_gamma` is EM-LLM's
    surprisal_threshold_gamma; `surprise_window` the number of past tokens whose surprise sets
    the threshold, default `local_blocks * block_size`). repr_tokens: score blocks by InfLLM's
    r representative tokens (None: by their mean key).
    """

    capacity: int
    block_size: int = 64
    init_blocks: int = 1
    local_blocks: int = 4
    top_k: int = 4
    clip_positions: bool = True
    boundaries: str = "fixed"
    min_block_size: int = 8
    surprise_gamma: float = 1.0
    surprise_window: int | None = None
    repr_tokens: int | None = None

    def __post_init__(self):
        self._check_ints(1, "capacity", "block_size", "top_k")
        if not isinstance(self.clip_positions, bool):
            raise ValueError(f"RetrievedBlocks(clip_positions={self.clip_positions!r}); expected "
                             f"a bool")
        self._check_ints(0, "init_blocks", "local_blocks")
        if self.capacity % self.block_size:
            raise ValueError(f"RetrievedBlocks(capacity={self.capacity}) is not a multiple of "
                             f"block_size={self.block_size}")
        if self.boundaries not in _BOUNDARIES:
            raise ValueError(f"RetrievedBlocks(boundaries={self.boundaries!r}); expected one of "
                             f"{list(_BOUNDARIES)}")
        for name in ("min_block_size", "repr_tokens"):
            v = getattr(self, name)
            used = v is not None if name == "repr_tokens" else self.boundaries == "surprise"
            if used and (not is_int(v) or not 1 <= v <= self.block_size):
                raise ValueError(f"RetrievedBlocks({name}={v!r}); expected an int in 1.."
                                 f"block_size={self.block_size}")
            if is_int(v):
                object.__setattr__(self, name, int(v))
        if not isinstance(self.surprise_gamma, (int, float, np.integer, np.floating)) or \
                isinstance(self.surprise_gamma, (bool, np.bool_)):
            raise ValueError(f"RetrievedBlocks(surprise_gamma={self.surprise_gamma!r}); expected "
                             f"a float")
        w = self.surprise_window
        if is_int(w):
            w = int(w)
            object.__setattr__(self, "surprise_window", w)
        if (w is not None and (not is_int(w) or w <= 0)) or (
                self.boundaries == "surprise" and self.window < 2):
            raise ValueError(f"RetrievedBlocks(surprise_window={w!r}) gives a window of "
                             f"{self.window} tokens (default local_blocks * block_size); "
                             f"expected >= 2")

    @property
    def window(self) -> int:
        """Past tokens whose surprise sets a segment's event threshold."""
        if self.surprise_window is None:
            return self.local_blocks * self.block_size
        return self.surprise_window

    @property
    def needs_next_tokens(self):
        return self.boundaries == "surprise"

    @property
    def max_events(self) -> int:
        """Events the store can hold: every closed event has >= min_block_size tokens."""
        return self.capacity // self.min_block_size + 1

    def check(self, cfg):
        super().check(cfg)
        if self.boundaries == "surprise" and cfg.attention.impl == "pallas":
            raise ValueError("RetrievedBlocks(boundaries='surprise') attends through a "
                             "token-level mask the Pallas kernels cannot evaluate; "
                             "cfg.attention.impl='pallas': set AttentionConfig(impl='xla') or "
                             "'auto' (which uses xla for it)")

    def check_segment(self, segment_len):
        if segment_len % self.block_size:
            raise ValueError(f"segment_len={segment_len} is not a multiple of RetrievedBlocks("
                             f"block_size={self.block_size})")

    def init(self, cfg, batch, memory_params):
        shape = (batch, cfg.num_layers, self.capacity, cfg.num_kv_heads, cfg.head_dim)
        layers = {"k": jnp.zeros(shape, cfg.compute_dtype),
                  "v": jnp.zeros(shape, cfg.compute_dtype),
                  "valid": jnp.zeros(shape[:3], bool)}
        if self.repr_tokens is not None:
            layers["score"] = jnp.zeros(shape[:4], f32)
        if self.boundaries == "fixed":
            return {"layers": layers}
        return {"layers": layers,
                "carried": {"start": jnp.zeros((batch, self.capacity), bool),
                            "history": jnp.zeros((batch, self.window), f32),
                            "history_valid": jnp.zeros((batch, self.window), bool),
                            # >= block_size: a document's first token starts an event.
                            "run": jnp.full((batch,), self.block_size, jnp.int32)}}

    def selection(self, state, q, ctx, starts=None):
        """What each query block may see. Fixed blocks (starts None): bool [B, H, nq, nk] over
        the store's blocks then the segment's. Events (starts [B, C] bool): bool
        [B, H, nq, C + T] over the store's tokens then the segment's."""
        B, T, H, D = q.shape
        K = state["k"].shape[2]
        bs, C = self.block_size, self.capacity
        nq = T // bs
        rows = jnp.arange(B)[:, None]
        if starts is None:
            n = C // bs
            ids = jnp.broadcast_to(jnp.arange(C) // bs, (B, C))
        else:
            n = self.max_events
            ids = jnp.clip(jnp.cumsum(starts, 1) - 1, 0, n - 1)
        reps = block_representatives(state["k"], state["valid"], ids, n, state.get("score"),
                                     self.repr_tokens)  # [B, n, K, D]
        q_mean = q.astype(f32).reshape(B, nq, bs, K, H // K, D).mean((2, 4))  # [B, nq, K, D]
        scores = jnp.einsum("bikd,bjkd->bkij", q_mean, reps)  # [B, K, nq, n]
        first = ctx.positions[:, :1]  # [B, 1]: where this segment starts
        if starts is None:
            j = jnp.arange(n)[None]
            filled = state["valid"].reshape(B, n, bs).any(-1)  # [B, n]
            fixed = filled & ((j < self.init_blocks) | (j >= first // bs - self.local_blocks))
            candidate = filled & ~fixed
        else:
            slot = jnp.arange(C)[None]
            fixed = state["valid"] & ((slot < self.init_blocks * bs)
                                      | (slot >= first - self.local_blocks * bs))  # tokens
            candidate = jnp.zeros((B, n + 1), bool).at[
                rows, jnp.where(state["valid"], ids, n)].max(state["valid"] & ~fixed)[:, :n]
        scores = jnp.where(candidate[:, None, None], scores, -jnp.inf)
        _, top = lax.top_k(scores, min(self.top_k, n))
        chosen = jnp.zeros(scores.shape, bool).at[
            jnp.arange(B)[:, None, None, None], jnp.arange(K)[None, :, None, None],
            jnp.arange(nq)[None, None, :, None], top].set(True) & candidate[:, None, None]
        if starts is None:
            past = chosen | fixed[:, None, None]  # [B, K, nq, n]
        else:  # token c is seen when its event is chosen
            past = jnp.take_along_axis(chosen, jnp.broadcast_to(ids[:, None, None], (B, K, nq, C)),
                                       -1)
            past = (past & state["valid"][:, None, None]) | fixed[:, None, None]
        past = jnp.repeat(past, H // K, axis=1)  # per query head
        current = jnp.ones((B, H, nq, nq if starts is None else T), bool)
        return jnp.concatenate([past, current], -1)

    def _key_positions(self, state, ctx):
        """The RoPE position of every stored key [B, C] (see the module docstring)."""
        B, C = state["valid"].shape
        idx = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C))
        if not self.clip_positions:
            return idx
        local_start = jnp.maximum(ctx.positions[:, :1] - self.local_blocks * self.block_size, 0)
        return jnp.where(idx >= local_start, idx, jnp.maximum(local_start - 1, 0))

    def _mask(self, selection, kv_valid, q_len, events):
        if events:
            return TokenRows(selection, self.block_size) & Causal()
        return (BlockMask(selection, self.block_size) & Causal()
                & key_validity(q_len, kv_valid[None]))

    def _attend(self, state, starts, q, k, v, ctx, with_lse=False):
        """(attention output [B, T, H, D], each query's softmax normaliser [B, T, H] or None)."""
        T = q.shape[1]
        events = starts is not None
        selection = self.selection(state, q, ctx, starts)
        store_k = apply_rope(state["k"], self._key_positions(state, ctx), ctx.inv_freq,
                             ctx.attention_factor)
        qr = ctx.rope(q)
        keys = jnp.concatenate([store_k.astype(q.dtype), ctx.rope(k)], 1)
        values = jnp.concatenate([state["v"].astype(v.dtype), v], 1)
        kv_valid = jnp.concatenate([state["valid"], jnp.ones_like(ctx.valid)], 1)

        a = ctx.cfg.attention
        # A token-level mask: on "auto", the blockwise XLA path (the kernels cannot take it).
        impl = "xla" if events and a.impl == "auto" else a.impl

        def one(q1, k1, v1, sel1, valid1):
            mask = self._mask(sel1, valid1, T, events)
            return attend(q1[None], k1[None], v1[None], mask, impl=impl, block_q=a.block_q,
                          block_k=a.block_k)[0]

        out = jax.vmap(one)(qr, keys, values, selection, kv_valid)
        if not with_lse:
            return out, None

        def lse_one(q1, k1, v1, sel1, valid1):
            mask = self._mask(sel1, valid1, T, events)
            S, H, K = k1.shape[0], q1.shape[1], k1.shape[1]
            layout = mask_layout(mask, T, S, min(a.block_q, T), min(a.block_k, S), num_heads=H,
                                 num_kv_heads=K)
            _, lse = attention_with_lse(q1[None], k1[None], v1[None], mask.prepare(T, S), layout,
                                        scale=default_scale(q1.shape[-1]))
            return lse[0, ..., 0]  # [T, H]

        inputs = jax.tree.map(lax.stop_gradient, (qr, keys, values))
        return out, jax.vmap(lse_one)(*inputs, selection, kv_valid)

    def _received(self, state, q, k, lse, ctx):
        """Attention the local window's and the segment's keys received from the segment's
        queries (summed over queries and each KV head's query heads): (slots [B, W + T], with
        the capacity for none, scores [B, W + T, K] float32)."""
        B, T, H, D = q.shape
        C, K = self.capacity, k.shape[2]
        W = self.local_blocks * self.block_size
        first = ctx.positions[:, :1]
        slots = jnp.maximum(first - W, 0) + jnp.arange(W)[None]  # [B, W]
        in_store = slots < jnp.minimum(first, C)
        safe = jnp.minimum(slots, C - 1)
        window_k = jnp.take_along_axis(state["k"], safe[..., None, None], 1)
        window_k = apply_rope(window_k, slots, ctx.inv_freq, ctx.attention_factor)  # true places
        keys = jnp.concatenate([window_k.astype(k.dtype), ctx.rope(k)], 1)  # [B, W + T, K, D]
        key_ok = jnp.concatenate([in_store & jnp.take_along_axis(state["valid"], safe, 1),
                                  ctx.valid], 1)
        seen = jnp.concatenate([jnp.ones((T, W), bool), jnp.tri(T, dtype=bool)], 1)  # [T, W+T]
        seen = seen[None] & key_ok[:, None] & ctx.valid[:, :, None]  # [B, T, W + T]
        logits = jnp.einsum("btkgd,bskd->bkgts", grouped(ctx.rope(q), K), keys,
                            preferred_element_type=f32) * default_scale(D)
        norm = grouped(lse[..., None], K)[..., 0].transpose(0, 2, 3, 1)[..., None]  # [B,K,G,T,1]
        p = jnp.where(seen[:, None, None], jnp.exp(logits - norm), 0.0)
        received = lax.stop_gradient(p.sum((2, 3)).transpose(0, 2, 1))  # [B, W + T, K]
        own = jnp.where(ctx.valid, ctx.positions, C)
        return jnp.concatenate([jnp.where(in_store, slots, C), own], 1), received

    def carried_layer(self, state, carried, params, h, q, k, v, ctx):
        starts = None if carried is None else carried["start"]
        with_lse = self.repr_tokens is not None
        out, lse = self._attend(state, starts, q, k, v, ctx, with_lse=with_lse)
        received = self._received(state, q, k, lse, ctx) if with_lse else None
        return out, self._write(state, k, v, ctx, received), carried

    def read(self, state, params, h, q, k, v, ctx):
        return self._attend(state, None, q, k, v, ctx)[0]

    def write(self, state, params, h, q, k, v, ctx):
        return self._write(state, k, v, ctx)

    def _write(self, state, k, v, ctx, received=None):
        B, T = ctx.valid.shape
        slot = jnp.where(ctx.valid, ctx.positions, self.capacity)  # past capacity: dropped
        rows = jnp.arange(B)[:, None]
        new = {"k": state["k"].at[rows, slot].set(lax.stop_gradient(k).astype(state["k"].dtype),
                                                  mode="drop"),
               "v": state["v"].at[rows, slot].set(lax.stop_gradient(v).astype(state["v"].dtype),
                                                  mode="drop"),
               "valid": state["valid"].at[rows, slot].set(True, mode="drop")}
        if "score" in state:
            new["score"] = state["score"]
            if received is not None:
                slots, add = received
                new["score"] = new["score"].at[rows, slots].add(add, mode="drop")
        return new

    def end_segment(self, state, logits, next_tokens, next_valid, ctx):
        """EM-LLM's boundaries for this segment's tokens, from its own surprise."""
        surprise = surprise_of(logits, next_tokens)
        events = self.update_events(state["carried"], surprise, next_valid & ctx.valid,
                                    ctx.valid, ctx.positions)
        return {**state, "carried": events}

    def update_events(self, events, surprise, known, valid, positions):
        """The "carried" state after a segment whose tokens (valid [B, T], at positions [B, T])
        have surprise [B, T] float32, known where `known` (EM-LLM's rule, lcm.memory.events)."""
        threshold = surprise_threshold(events["history"], events["history_valid"], surprise,
                                       known, self.surprise_gamma)
        divide = known & (surprise > threshold[:, None])
        starts, run = event_starts(divide, valid, events["run"], min_size=self.min_block_size,
                                   max_size=self.block_size)
        rows = jnp.arange(valid.shape[0])[:, None]
        slot = jnp.where(valid, positions, self.capacity)
        history, history_valid = last_valid(
            jnp.concatenate([events["history"], surprise], 1),
            jnp.concatenate([events["history_valid"], known], 1), self.window)
        return {"start": events["start"].at[rows, slot].set(starts, mode="drop"),
                "history": history, "history_valid": history_valid, "run": run}
