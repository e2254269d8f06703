"""The functional decoder: `forward(params, tokens, cfg)`, layers under `jax.lax.scan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcm.attention import Document
from lcm.attention.ring import context_axis_size, ring_order_for
from lcm.config import ModelConfig
from lcm.model.checks import check_params, check_token_ids
from lcm.model.layers import identity, rms_norm, rope_tables, run_layers, self_attention
from lcm.sharding.rules import explicit_axes

def segment_positions(segment_ids):
    """Positions that restart at 0 at each new segment. segment_ids [B, T] -> [B, T] int32.

    A segment is a run of equal ids (packed documents are contiguous).
    """
    T = segment_ids.shape[1]
    idx = jnp.arange(T, dtype=jnp.int32)[None]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - first


def _check_auto_axes(params, tokens, positions, segment_ids):
    """The model shards by logical axes, on Auto mesh axes: a mesh with Explicit ones
    (jax.make_mesh's default) set by jax.set_mesh, or inputs placed on one, are refused with
    the way out (lcm.sharding.auto_mesh) rather than failing deep inside."""
    if axes := explicit_axes(jax.sharding.get_abstract_mesh()):
        raise ValueError(f"the mesh set by jax.set_mesh has Explicit axes {axes} (jax.make_mesh's "
                         f"default); the model shards by logical axes on Auto axes: set "
                         f"jax.set_mesh(lcm.sharding.auto_mesh(mesh)) (shard_params and "
                         f"LogicalSharding convert a mesh themselves)")
    named = {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "params": params}
    for name, tree in named.items():
        for leaf in jax.tree.leaves(tree):
            sharding = getattr(jax.typeof(leaf), "sharding", None)
            if sharding is not None and (axes := explicit_axes(sharding.mesh)):
                raise ValueError(f"{name} is placed on a mesh with Explicit axes {axes} "
                                 f"(jax.make_mesh's default); place it on "
                                 f"lcm.sharding.auto_mesh(mesh) (shard_params does) so the "
                                 f"model's logical-axis sharding applies")


def forward(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None,
            shard=None):
    """Next-token logits. tokens [B, T] int -> logits [B, T, vocab] float32.

    positions [B, T] int: the RoPE position of each token (default 0..T-1, or restarting at 0 at
    each segment when segment_ids are given). segment_ids [B, T] int: packed sequences; a token
    attends only within its segment. shard: optional `(x, logical_axes) -> x` that constrains
    activations to a mesh (see `lcm.sharding.LogicalSharding`); None leaves placement to XLA.
    """
    _check_forward_inputs(tokens, cfg, positions, segment_ids)
    _check_auto_axes(params, tokens, positions, segment_ids)
    check_params(params, cfg)
    check_token_ids(tokens, cfg.vocab_size)
    shard = identity if shard is None else shard
    B, T = tokens.shape
    order = _context_order(T, cfg)
    if positions is None:
        positions = (segment_positions(segment_ids) if segment_ids is not None
                     else jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    if order is not None:
        # Context parallelism: into the ring order once here, logits back once at the end.
        # Segment ids stay in order: ring attention reads them there (replicated per device).
        tokens, positions = order.to_ring(tokens), order.to_ring(positions)
    document = None if segment_ids is None else Document(segment_ids)
    # Length-dependent RoPE (dynamic, longrope) sees the largest position + 1, as transformers.
    tables = rope_tables(cfg, jnp.max(positions) + 1)

    x = shard(embed(params, tokens, cfg), ("batch", "seq", "embed"))

    def attention(inputs, xs, carry):
        mask = inputs.kind.mask() if document is None else inputs.kind.mask() & document
        inv_freq, attention_factor = tables[inputs.kind.rope]
        out = self_attention(inputs.q, inputs.k, inputs.v, positions=positions,
                             inv_freq=inv_freq, attention_factor=attention_factor, mask=mask,
                             attention=cfg.attention, position=cfg.positions, ring_order=order,
                             softcap=cfg.attn_softcap, sinks=inputs.params.get("sinks"))
        return out, None, carry

    x, _, _ = run_layers(x, params["layers"], cfg, attention, remat=cfg.remat, shard=shard)
    logits = unembed(params, x, cfg)
    if order is not None:
        logits = order.from_ring(shard(logits, ("batch", "seq", "vocab")))
    return shard(logits, ("batch", "seq", "vocab"))


def _context_order(length, cfg: ModelConfig):
    """The RingOrder of a context-parallel model over the mesh's `context` axis, else None."""
    if not cfg.attention.context_parallel:
        return None
    if cfg.positions is not None and cfg.positions.type != "rope":
        raise ValueError(f"PositionConfig(type={cfg.positions.type!r}) with attention impl="
                         f"{cfg.attention.impl!r}: context parallelism runs with type 'rope' "
                         f"only; use impl 'xla' or 'pallas'")
    return ring_order_for(length, context_axis_size(), cfg.attention.load_balance,
                          block_q=cfg.attention.block_q, block_k=cfg.attention.block_k)


def embed(params, tokens, cfg: ModelConfig):
    """Token embeddings in the compute dtype. tokens [B, T] -> [B, T, E].

    With `cfg.embed_scale` (Gemma) they are multiplied by sqrt(hidden_size) rounded to the
    compute dtype, as transformers does.
    """
    x = params["embed"].astype(cfg.compute_dtype)[tokens]
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
    return x


def unembed(params, x, cfg: ModelConfig):
    """Final norm and LM head (tied or not). x [B, T, E] -> logits [B, T, vocab] float32.

    With `cfg.final_softcap` (Gemma 2) the logits become cap * tanh(logits / cap).
    """
    x = rms_norm(x, params["final_norm"], cfg.norm_eps, cfg.norm_weight_offset)
    if cfg.tie_embeddings:
        logits = jnp.einsum("bte,ve->btv", x, params["embed"].astype(x.dtype))
    else:
        logits = jnp.einsum("bte,ev->btv", x, params["lm_head"].astype(x.dtype))
    logits = logits.astype(jnp.float32)
    if cfg.final_softcap is not None:
        logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
    return logits


def _check_forward_inputs(tokens, cfg, positions, segment_ids):
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg={type(cfg).__name__}; expected a ModelConfig")
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: shape {getattr(tokens, 'shape', None)}, dtype "
                         f"{getattr(tokens, 'dtype', None)}; expected int [batch, seq]")
    if 0 in tokens.shape:
        raise ValueError(f"tokens has shape {tokens.shape}; expected a non-empty [batch, seq]")
    for name, x in (("positions", positions), ("segment_ids", segment_ids)):
        if x is None:
            continue
        shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
        if shape != tokens.shape or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"{name}: shape {shape}, dtype {dtype}; expected an int array with "
                             f"the shape of tokens {tokens.shape}")
