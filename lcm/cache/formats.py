"""Prefill and decoding for policies that own their cache format: KIVI (quantized codes),
Quest (full cache with page key bounds, sparse reads) and DuoAttention (split full/streaming
storage).

These policies do not evict from a `KVCache`; each stores a layer its own way, so the model
runs against a `PolicyCache` whose `layers` are the policy's per-layer states. The decoder is
the one of `lcm.model` (same projections, RoPE, MLP), as in `lcm.cache.prefill`:

    logits, cache = policy_prefill(params, tokens, cfg, policy=KIVI(bits=2), lengths=lengths,
                                   max_new_tokens=32)
    logits, cache = policy_decode_step(params, cache, next_tokens, cfg)

KIVI and Quest have the same state shapes in every layer and run the layers under `lax.scan`;
DuoAttention's layers hold different numbers of retrieval and streaming heads (that is where
the memory goes), so its layers are unrolled. Prompts are right-padded; each row continues at
its own position. Size the cache with `max_new_tokens`: a row must not decode past
prompt length + max_new_tokens tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lcm.cache.checks import check_chunk, check_count, check_prompt, check_tokens
from lcm.cache.compress import capacity as kept_slots
from lcm.cache.compress import check_policy, compress_layer, observe_layer
from lcm.cache.kv import prompt_entries
from lcm.cache.presses.base import Press
from lcm.config import ModelConfig
from lcm.model import embed, run_layers, unembed
from lcm.positions import apply_rope, rope_frequencies


def owns_cache(policy) -> bool:
    """True for presses whose cache is a `PolicyCache` (KIVI, Quest, DuoAttention)."""
    return isinstance(policy, Press) and policy.owns_cache


@functools.partial(jax.tree_util.register_dataclass, data_fields=["layers", "next_pos"],
                   meta_fields=["policy", "capacity"])
@dataclasses.dataclass(frozen=True)
class PolicyCache:
    """layers: the policy's layer states, stacked on a leading layer axis (KIVI, Quest) or a
    tuple with one state per layer (DuoAttention); next_pos [B] int32: each row's next position;
    capacity: static tokens per row."""

    layers: object
    next_pos: jax.Array
    policy: object
    capacity: int

    def nbytes(self) -> int:
        """Bytes held by the arrays of the cache (what a device must store)."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    def layer(self, index: int):
        """The state of one layer."""
        if isinstance(self.layers, tuple):
            return self.layers[index]
        return jax.tree.map(lambda x: x[index], self.layers)


def policy_prefill(params, tokens, cfg: ModelConfig, *, policy, lengths=None,
                   max_new_tokens: int = 0, chunk_size: int | None = None,
                   all_logits: bool = False):
    """Runs right-padded prompts tokens [B, T] (real lengths [B]) into a `PolicyCache` with
    room for max_new_tokens more per row. Returns (logits float32 [B, vocab] at each row's last
    real token, or [B, T, vocab] with all_logits, cache)."""
    lengths = check_prompt(tokens, cfg, lengths, params=params)
    check_count("max_new_tokens", max_new_tokens, minimum=0)
    if not owns_cache(policy):
        raise ValueError(f"policy={policy!r}; expected a press that keeps its own cache format "
                         f"(KIVI, Quest, DuoAttention)")
    check_policy(policy, cfg, tokens.shape[1])
    return format_prefill(params, tokens, lengths, cfg=cfg, policy=policy,
                          chunk=check_chunk(chunk_size, cfg), room=int(max_new_tokens),
                          all_logits=bool(all_logits))


def policy_decode_step(params, cache: PolicyCache, tokens, cfg: ModelConfig):
    """Feeds one token per row, tokens [B] int -> (logits float32 [B, vocab], cache)."""
    if not isinstance(cache, PolicyCache):
        raise ValueError(f"cache={type(cache).__name__}; expected a PolicyCache")
    return format_decode_step(params, cache, check_tokens(tokens, cache.next_pos), cfg=cfg)


# ---------------------------------------------------------------------------- implementations

def _evict(evict, q, qr, kr, v, lengths, layer, cfg, chunk, inv_freq, factor):
    """One layer's entries kept by `evict` (as `prefill(..., policy=evict)` keeps them), in
    position order: {k, v [B, K, kept, D], pos [B, K, kept], length [B, K]}."""
    real = jnp.arange(kr.shape[1], dtype=jnp.int32)[None] < lengths[:, None]
    entries = prompt_entries(kr, v, real, lengths)
    obs = observe_layer(evict, q, qr, kr, real, lengths, chunk=chunk, cfg=cfg)
    return compress_layer(evict, entries, obs, layer=layer, cfg=cfg, inv_freq=inv_freq,
                          factor=factor, next_pos=lengths)


@functools.partial(jax.jit, static_argnames=("cfg", "policy", "chunk", "room", "all_logits"))
def format_prefill(params, tokens, lengths, *, cfg, policy, chunk, room, all_logits):
    B, T = tokens.shape
    capacity = T + room
    evict = policy.evict  # e.g. KIVI after an eviction policy's selection
    if evict is not None:
        capacity = min(kept_slots(evict, T, cfg.num_layers, cfg.num_kv_heads), T) + room
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    inv_freq, factor = rope_frequencies(cfg.rope, cfg.head_dim, jnp.max(lengths))

    def attention(inputs, xs, carry):
        layer = inputs.index
        qr = apply_rope(inputs.q, positions, inv_freq, factor)
        kr = apply_rope(inputs.k, positions, inv_freq, factor)
        out = policy.prefill_attention(qr, kr, inputs.v, layer=layer, cfg=cfg, chunk=chunk)
        k, v, kept_lengths = kr, inputs.v, lengths
        if evict is not None:  # what the eviction press keeps, in position order
            kept = _evict(evict, inputs.q, qr, kr, inputs.v, lengths, layer, cfg, chunk,
                          inv_freq, factor)
            k, v = kept["k"].transpose(0, 2, 1, 3), kept["v"].transpose(0, 2, 1, 3)
            kept_lengths = kept["length"][:, 0]
        state = policy.prefill_state(k, v, kept_lengths, capacity=capacity, layer=layer)
        return out, state, carry

    x = embed(params, tokens, cfg)
    x, layers, _ = run_layers(x, params["layers"], cfg, attention, unrolled=policy.unrolled)
    if all_logits:
        logits = unembed(params, x, cfg)
    else:
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
        logits = unembed(params, last, cfg)[:, 0]
    return logits, PolicyCache(layers, lengths, policy, capacity)


@functools.partial(jax.jit, static_argnames=("cfg",))
def format_decode_step(params, cache, tokens, *, cfg):
    policy = cache.policy
    position = cache.next_pos
    inv_freq, factor = rope_frequencies(cfg.rope, cfg.head_dim, jnp.max(position) + 1)

    def attention(inputs, state, carry):
        qr = apply_rope(inputs.q, position[:, None], inv_freq, factor)
        kr = apply_rope(inputs.k, position[:, None], inv_freq, factor)
        out, state = policy.decode_layer(state, qr, kr[:, 0], inputs.v[:, 0], layer=inputs.index)
        return out, state, carry

    x = embed(params, tokens[:, None], cfg)
    x, layers, _ = run_layers(x, params["layers"], cfg, attention, xs=cache.layers,
                              unrolled=policy.unrolled)
    logits = unembed(params, x, cfg)[:, 0]
    return logits, dataclasses.replace(cache, layers=layers, next_pos=position + 1)
