"""`run_segments`: the decoder of `lcm.model` run segment by segment with a memory kind.

    params, _ = init_params(cfg, key)                   # or a loaded model
    logits, state = run_segments(params, tokens, cfg, memory=TransformerXL(mem_len=512),
                                 segment_len=256)
    more, state = run_segments(params, next_tokens, cfg, memory=..., segment_len=256, state=state)

The state is `{"position": [B] int32, "memory": the kind's state}`: a pytree of arrays, so it
can be sharded, saved with Orbax mid-sequence and resumed exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcm.checks import check_int
from lcm.config import ModelConfig
from lcm.memory.base import Memory, NoMemory, SegmentContext
from lcm.memory.scan import segment_scan
from lcm.model import (WeightSpec, check_params, check_token_ids, embed, identity, rope_tables,
                       run_layers, unembed)


def _is_spec(x):
    return isinstance(x, WeightSpec)


def _check_cfg(cfg) -> None:
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg={type(cfg).__name__}; expected a ModelConfig")


def _memory_of(memory) -> Memory:
    if memory is None:
        return NoMemory()
    if not isinstance(memory, Memory):
        raise ValueError(f"memory={memory!r}; expected None or a memory kind from lcm.memory "
                         f"(TransformerXL, RecurrentMemory, CompressiveMemory, KNNMemory, "
                         f"LinearRecurrence, RetrievedBlocks)")
    return memory


def memory_param_specs(memory, cfg: ModelConfig) -> dict:
    """The WeightSpecs of the extra weights `memory` needs with `cfg` ({} for none)."""
    memory = _memory_of(memory)
    _check_cfg(cfg)
    memory.check(cfg)
    return memory.param_specs(cfg)


def init_memory_params(memory, cfg: ModelConfig, key) -> tuple[dict, dict]:
    """Random extra weights of `memory` and their logical axes: `(params, axes)`.

    Shard them with `lcm.sharding.shard_params(params, axes, mesh)` like the model's own.
    """
    specs = memory_param_specs(memory, cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, max(len(leaves), 1))
    params = jax.tree.unflatten(
        treedef, [s.initialize(k, cfg.weight_dtype) for s, k in zip(leaves, keys)])
    axes = jax.tree.map(lambda s: s.axes, specs, is_leaf=_is_spec)
    return params, axes


def init_memory_state(memory, cfg: ModelConfig, batch: int, memory_params=None) -> dict:
    """The state of a fresh sequence: position 0 and the kind's empty memory."""
    memory = _memory_of(memory)
    _check_cfg(cfg)
    memory.check(cfg)
    check_int(None, "batch", batch, 1)
    batch = int(batch)
    memory_params = _checked_params(memory, cfg, memory_params)
    return {"position": jnp.zeros((batch,), jnp.int32),
            "memory": memory.init(cfg, batch, memory_params)}


def _checked_params(memory, cfg, memory_params):
    specs = memory.param_specs(cfg)
    if isinstance(memory_params, (tuple, list)):
        raise ValueError(f"memory_params is a {type(memory_params).__name__} of "
                         f"{len(memory_params)}; expected the params dict: init_memory_params "
                         f"returns (params, axes), pass its first item")
    if memory_params is not None and not isinstance(memory_params, dict):
        raise ValueError(f"memory_params={type(memory_params).__name__}; expected None or the "
                         f"params dict of init_memory_params(memory, cfg, key)[0]")
    if memory_params is None:
        memory_params = {}
        if specs:
            raise ValueError(f"memory={memory!r} has learned weights: pass memory_params from "
                             f"init_memory_params(memory, cfg, key)")
    want = jax.tree.map(lambda s: s.shape, specs, is_leaf=_is_spec)
    got = jax.tree.map(lambda x: tuple(x.shape), memory_params)
    if want != got:
        raise ValueError(f"memory_params {got} do not fit memory={memory!r} with cfg "
                         f"(hidden_size={cfg.hidden_size}, num_layers={cfg.num_layers}, "
                         f"num_heads={cfg.num_heads}, num_kv_heads={cfg.num_kv_heads}, "
                         f"head_dim={cfg.head_dim}); expected {want}")
    return memory_params


def run_segments(params, tokens, cfg: ModelConfig, *, memory, segment_len: int, state=None,
                 memory_params=None, start_of_sequence=None, bptt_segments: int | None = None,
                 targets=None, shard=None, remat: bool = True):
    """Logits of every token and the final state, processing `segment_len` tokens at a time.

    tokens [B, T] int; T need not be a multiple of segment_len (the last segment is padded and
    the padding masked: it never reaches the memory and does not advance positions). memory: a
    kind from lcm.memory, or None (segments alone). state: from a previous call, or None for a
    fresh sequence. memory_params: from `init_memory_params` when the kind has weights.
    start_of_sequence [B, num_segments] bool: example b starts a new document at that segment
    (its memory and positions reset); documents must start on segment boundaries.
    bptt_segments, remat: see `segment_scan`. shard: as in `lcm.model.forward`.
    targets [B, T] int: return the log-probability of targets[b, t] at each position instead of
    the logits (computed segment by segment, so a long document never holds [T, vocab] logits).
    Returns (logits [B, T, vocab] float32 or, with targets, log-probs [B, T] float32, state).
    """
    memory = _memory_of(memory)
    _check_cfg(cfg)
    memory.check(cfg)
    check_int(None, "segment_len", segment_len, 1)
    segment_len = int(segment_len)
    memory.check_segment(segment_len)
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: shape {getattr(tokens, 'shape', None)}, dtype "
                         f"{getattr(tokens, 'dtype', None)}; expected int [batch, seq]")
    if 0 in tokens.shape:
        raise ValueError(f"tokens has shape {tokens.shape}; expected a non-empty [batch, seq]")
    memory_params = _checked_params(memory, cfg, memory_params)
    check_params(params, cfg)
    check_token_ids(tokens, cfg.vocab_size)
    if targets is not None:
        check_token_ids(targets, cfg.vocab_size, "targets")
    shard = identity if shard is None else shard
    B, T = tokens.shape
    N = -(-T // segment_len)
    pad = N * segment_len - T
    valid = jnp.arange(N * segment_len) < T
    tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    if targets is not None:
        if getattr(targets, "shape", None) != (B, T) or not jnp.issubdtype(targets.dtype,
                                                                           jnp.integer):
            raise ValueError(f"targets: shape {getattr(targets, 'shape', None)}, dtype "
                             f"{getattr(targets, 'dtype', None)}; expected int {(B, T)}")
        targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, N, segment_len).transpose(1, 0,
                                                                                           2)
    next_tokens = None
    if memory.needs_next_tokens:  # e.g. EM-LLM's surprise: -log p(next token) at each position
        nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        next_valid = jnp.broadcast_to(jnp.arange(N * segment_len) < T - 1, (B, N * segment_len))
        next_tokens = tuple(x.reshape(B, N, segment_len).transpose(1, 0, 2)
                            for x in (nxt, next_valid))
    segments = (tokens.reshape(B, N, segment_len).transpose(1, 0, 2),
                jnp.broadcast_to(valid.reshape(N, 1, segment_len), (N, B, segment_len)), targets,
                next_tokens)
    if start_of_sequence is not None:
        sos = jnp.asarray(start_of_sequence)
        if sos.shape != (B, N) or sos.dtype != jnp.bool_:
            raise ValueError(f"start_of_sequence: shape {sos.shape}, dtype {sos.dtype}; expected "
                             f"bool [batch, num_segments] = {(B, N)}")
        start_of_sequence = sos.T
    memory0 = {"position": jnp.zeros((B,), jnp.int32),
               "memory": memory.init(cfg, B, memory_params)}
    if state is not None and (jax.tree.structure(state) != jax.tree.structure(memory0) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(memory0)))):
        raise ValueError(f"state does not fit memory={memory!r} with batch {B} and cfg; expected "
                         f"{jax.tree.map(jnp.shape, memory0)}")

    def step(carry, segment):
        seg_tokens, seg_valid, seg_targets, seg_next = segment
        carry, logits = segment_forward(params, memory_params, cfg, memory, carry, seg_tokens,
                                        seg_valid, shard, next_tokens=seg_next)
        if seg_targets is None:
            return carry, logits
        logp = jax.nn.log_softmax(logits, -1)
        return carry, jnp.take_along_axis(logp, seg_targets[..., None], -1)[..., 0]

    state, out = segment_scan(step, memory0, segments, memory=state,
                              start_of_sequence=start_of_sequence,
                              bptt_segments=bptt_segments, remat=remat)
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(B, N * segment_len, *out.shape[3:])[:, :T], state


def segment_forward(params, memory_params, cfg, memory: Memory, carry, tokens, valid,
                    shard=identity, *, next_tokens=None):
    """One segment: (next carry, logits [B, T, vocab]). tokens [B, T]; valid [B, T] bool;
    next_tokens: (the token after each position [B, T], whether it is known [B, T]) for kinds
    that read it at the segment's end (`Memory.end_segment`)."""
    T = tokens.shape[1]
    positions = carry["position"][:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    x = shard(embed(params, tokens, cfg), ("batch", "seq", "embed"))
    mstate, seg_valid = carry["memory"], valid
    if memory.level == "token":
        x, positions, valid = memory.read(mstate, memory_params, x, valid, cfg)
    # Length-dependent RoPE (dynamic, longrope) sees this segment's largest position + 1; a table
    # switch invalidates cached keys, as for the KV cache.
    tables = rope_tables(cfg, jnp.max(positions) + 1)
    inv_freq, attention_factor = tables[cfg.layer_kinds[0].rope]
    ctx = SegmentContext(cfg=cfg, positions=positions, valid=valid, inv_freq=inv_freq,
                         attention_factor=attention_factor, shard=shard)
    layer_states = jax.tree.map(lambda s: jnp.moveaxis(s, 1, 0), mstate.get("layers", {}))
    layer_params = memory_params.get("layers", {})

    def attention(inputs, xs, carried):
        mp, ls = xs
        out, ls, carried = memory.carried_layer(
            ls, carried, mp, inputs.h, inputs.q, inputs.k, inputs.v,
            dataclasses.replace(ctx, layer=inputs.index, cfg=cfg.layer_config(inputs.kind),
                                inv_freq=tables[inputs.kind.rope][0],
                                attention_factor=tables[inputs.kind.rope][1]))
        return out, ls, carried

    # "carried": state that is not one slice per layer (e.g. kNN memory in a few layers only).
    x, layer_states, carried = run_layers(x, params["layers"], cfg, attention,
                                          xs=(layer_params, layer_states),
                                          carry=mstate.get("carried"), shard=shard)
    new_memory = dict(mstate)
    if "layers" in mstate:
        new_memory["layers"] = jax.tree.map(lambda s: jnp.moveaxis(s, 0, 1), layer_states)
    if "carried" in mstate:
        new_memory["carried"] = carried
    if memory.level == "token":
        x, new_memory = memory.write(new_memory, memory_params, x, params, cfg)
    logits = shard(unembed(params, x, cfg), ("batch", "seq", "vocab"))
    if next_tokens is not None:
        new_memory = memory.end_segment(new_memory, logits, *next_tokens, ctx)
    # Padding does not advance positions: a resumed call continues where the real tokens ended.
    advance = seg_valid.sum(1).astype(jnp.int32)
    return {"position": carry["position"] + advance, "memory": new_memory}, logits
