"""What every memory kind shares: the per-segment context, the kind protocol, small helpers.

A memory kind is a frozen dataclass with pure functions:

- `param_specs(cfg)`: the extra learned weights it needs (WeightSpecs with logical axes;
  per-layer ones stacked on a leading `layers` axis under "layers"), `{}` for none.
- `init(cfg, batch, memory_params)`: the empty state, a pytree of [B, ...] leaves; per-layer
  state sits under "layers" as [B, layers, ...] leaves.
- `read` / `write`: layer kinds (`level = "layer"`) get the layer's state, its extra params and
  q, k, v (before RoPE); `read` returns the attention output, `write` the next state. Token
  kinds (`level = "token"`, RMT) wrap the segment's embeddings instead (see `rmt.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcm.attention import Causal, Document, Local, attend
from lcm.checks import check_int
from lcm.config import ModelConfig
from lcm.positions import apply_rope

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SegmentContext:
    """One segment as the layers see it. positions [B, T] int32 (RoPE); valid [B, T] bool (False
    on the padding of a last, short segment); inv_freq / attention_factor from the RoPE config."""

    cfg: ModelConfig
    positions: jax.Array
    valid: jax.Array
    inv_freq: jax.Array
    attention_factor: float
    shard: Callable
    layer: Any = None  # inside the layer scan: this layer's index (a traced int32)

    def rope(self, x):
        return apply_rope(x, self.positions, self.inv_freq, self.attention_factor)

    def self_mask(self):
        """The model's own mask within the segment (causal, or its sliding window)."""
        w = self.cfg.sliding_window
        return Causal() if w is None else Local(w)

    def attend(self, q, k, v, mask):
        a = self.cfg.attention
        return attend(q, k, v, mask, impl=a.impl, block_q=a.block_q, block_k=a.block_k)


class Memory:
    """Base of the memory kinds (see the module docstring)."""

    level = "layer"
    needs_next_tokens = False  # True: run_segments calls end_segment with the next tokens

    def check(self, cfg: ModelConfig) -> None:
        """Raises ValueError naming the memory and the config when they do not fit."""
        if cfg.positions.type != "rope":
            raise ValueError(f"memory={self!r} needs RoPE positions; cfg.positions.type="
                             f"{cfg.positions.type!r} (set PositionConfig(type='rope'))")
        if cfg.attn_softcap is not None or cfg.attn_sinks:
            raise ValueError(f"memory={self!r} with cfg.attn_softcap={cfg.attn_softcap}, "
                             f"attn_sinks={cfg.attn_sinks}: the memory kinds' attention has "
                             f"neither soft-caps nor sink logits")
        if "chunked_attention" in (cfg.layer_types or ()):
            raise ValueError(f"memory={self!r} with 'chunked_attention' layers: not supported; "
                             f"use full or sliding layers")

    def _check_ints(self, minimum: int, *names) -> None:
        """Raises ValueError unless each field is an int >= minimum (NumPy ints pass and are
        stored as Python ints, so equal kinds hash alike as static arguments)."""
        for name in names:
            value = getattr(self, name)
            check_int(type(self).__name__, name, value, minimum, call=True)
            object.__setattr__(self, name, int(value))

    def check_segment(self, segment_len: int) -> None:
        """Raises ValueError when this memory cannot run segments of `segment_len` tokens."""

    def param_specs(self, cfg: ModelConfig) -> dict:
        return {}

    def init(self, cfg: ModelConfig, batch: int, memory_params) -> dict:
        return {}

    def read(self, state, params, h, q, k, v, ctx: SegmentContext):
        raise NotImplementedError

    def write(self, state, params, h, q, k, v, ctx: SegmentContext):
        return state

    def layer(self, state, params, h, q, k, v, ctx: SegmentContext):
        """(attention output [B, T, H, D], next layer state): read, then write."""
        return self.read(state, params, h, q, k, v, ctx), self.write(state, params, h, q, k, v,
                                                                      ctx)

    def carried_layer(self, state, carried, params, h, q, k, v, ctx: SegmentContext):
        """`layer` with the state under "carried" (not sliced per layer) passed along:
        (attention output, next layer state, next carried state)."""
        out, state = self.layer(state, params, h, q, k, v, ctx)
        return out, state, carried

    def end_segment(self, state, logits, next_tokens, next_valid, ctx: SegmentContext):
        """The next state once the segment's logits [B, T, vocab] are known (kinds with
        `needs_next_tokens`); next_tokens [B, T] int: the token after each position, next_valid
        [B, T] bool: whether it is known (False past the input's end and on padding)."""
        return state


@dataclasses.dataclass(frozen=True)
class NoMemory(Memory):
    """Each segment alone: causal attention within the segment, nothing carried (a baseline)."""

    def read(self, state, params, h, q, k, v, ctx):
        return ctx.attend(ctx.rope(q), ctx.rope(k), v, ctx.self_mask())


def key_validity(q_len, kv_valid):
    """A Document mask hiding invalid keys: every query (id 1) sees keys whose id is 1.
    kv_valid [B, S] bool."""
    ids = jnp.ones((kv_valid.shape[0], q_len), jnp.int32)
    return Document(ids, kv_valid.astype(jnp.int32))


def softmax_parts(logits_parts):
    """One softmax over several groups of logits [..., n_i] float32 (-inf = hidden), returned
    split as the groups were. Rows that see nothing give zeros, not NaN."""
    logits = jnp.concatenate(logits_parts, -1)
    m = jnp.max(logits, -1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    bounds = np.cumsum([x.shape[-1] for x in logits_parts])[:-1]
    return jnp.split(p, bounds, axis=-1)


def grouped(q, num_kv_heads):
    """[B, T, H, D] -> [B, T, K, G, D]."""
    B, T, H, D = q.shape
    return q.reshape(B, T, num_kv_heads, H // num_kv_heads, D)


def default_scale(head_dim):
    return 1.0 / math.sqrt(head_dim)
