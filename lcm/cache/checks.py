"""Argument checks shared by the cache's entry points (prefill, decode_step, generate, the
formats and the Self-Extend cache), raised before tracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcm.checks import check_int
from lcm.config import ModelConfig
from lcm.model import check_params, check_token_ids
from lcm.sharding.mesh import host_array


def check_model(cfg):
    """Raises ValueError unless cfg is a ModelConfig whose keys the KV cache can hold."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg={type(cfg).__name__}; expected a ModelConfig")
    if cfg.positions.type != "rope":
        raise ValueError(f"cfg.positions.type={cfg.positions.type!r}; the KV cache supports "
                         f"'rope' only (cached keys carry their RoPE rotation)")


def check_count(name, value, *, minimum):
    """Raises ValueError unless value is an int >= minimum."""
    check_int(None, name, value, minimum)


def check_tokens(tokens, next_pos):
    """One decode token per row: int [B] matching the cache's batch -> int32 array."""
    tokens = jnp.asarray(tokens)
    if tokens.shape != next_pos.shape or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: shape {tokens.shape}, dtype {tokens.dtype}; expected int "
                         f"[batch={next_pos.shape[0]}]")
    return tokens.astype(jnp.int32)


def check_chunk(chunk_size, cfg):
    """The attention block of a prefill: chunk_size, or cfg.attention.block_q."""
    if chunk_size is None:
        return cfg.attention.block_q
    check_count("chunk_size", chunk_size, minimum=1)
    return int(chunk_size)


def check_prompt(tokens, cfg, lengths, params=None):
    """Validates cfg for this cache, params against cfg, tokens [B, T] (ids inside the
    vocabulary where real) and lengths [B]; returns lengths as int32."""
    check_model(cfg)
    if params is not None:
        check_params(params, cfg)
    lengths = check_prompt_lengths(tokens, lengths)
    check_token_ids(tokens, cfg.vocab_size, lengths=lengths)
    return lengths


def check_prompt_lengths(tokens, lengths):
    """Validates tokens [B, T] and lengths [B]; returns lengths as int32 (checked in range
    when concrete)."""
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens: shape {getattr(tokens, 'shape', None)}, dtype "
                         f"{getattr(tokens, 'dtype', None)}; expected int [batch, seq]")
    B, T = tokens.shape
    if B == 0 or T == 0:
        raise ValueError(f"tokens has shape {tokens.shape}; expected a non-empty [batch, seq]")
    return check_row_lengths(lengths, B, T, minimum=1)


def check_row_lengths(lengths, batch: int, length: int, *, minimum: int):
    """lengths [batch] int, each in [minimum, length] when concrete (None: every row `length`)
    -> int32 [batch]."""
    if lengths is None:
        return jnp.full((batch,), length, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths: shape {lengths.shape}, dtype {lengths.dtype}; expected int "
                         f"[batch={batch}]")
    if not isinstance(lengths, jax.core.Tracer):
        got = host_array(lengths)
        if got.min() < minimum or got.max() > length:
            raise ValueError(f"lengths={got.tolist()}; expected every length in [{minimum}, "
                             f"{length}] (tokens are right-padded to {length})")
    return lengths.astype(jnp.int32)
