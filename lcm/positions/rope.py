"""Rotary position embeddings: frequencies from a RopeConfig (the Hugging Face scaling family),
and the rotation itself.

Every table follows transformers 5 (`modeling_rope_utils.py`) operation by operation in float32:
the static ones equal transformers' bit for bit, dynamic's length-dependent one (jnp, so that
seq_len may be traced) is within 2 ulp. Angles are always float32: in bf16, positions past 256
are no longer consecutive integers (at 100k they step by 512).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lcm.checks import is_int
from lcm.config import RopeConfig

LAYOUTS = ("half", "interleaved")
_F32 = jnp.float32


def rope_frequencies(rope: RopeConfig, head_dim: int, seq_len=None):
    """Inverse frequencies and the attention factor: `(inv_freq [rotary_dim // 2] float32, float)`.

    rotary_dim = int(head_dim * rope.partial_rotary_factor); `apply_rope` rotates that many
    leading features and passes the rest through. (proportional returns head_dim // 2 entries,
    its unrotated pairs with frequency 0.) The attention factor multiplies cos and sin, so it
    scales q and k, and the attention logits by its square. It never depends on seq_len.

    seq_len is the length the table must cover; transformers uses max(position_ids) + 1 over the
    whole batch. Only dynamic and longrope read it, and it may be a traced int: both tables are
    built and one is picked with `jnp.where`, so one compiled program serves every length. None
    gives the table of the original length (transformers' initial one). `lcm.model.forward`
    passes the token count T, which is transformers' value for the default positions 0..T-1;
    with explicit positions (offsets, packed segments) transformers would use max(positions) + 1.

    - dynamic: M = rope.max_position_embeddings; up to M the default table, past it theta becomes
      theta * (factor * seq_len / M - (factor - 1)) ** (dim / (dim - 2)).
    - longrope: short_factor while seq_len <= original_max_position_embeddings, long_factor past.

    Switching tables invalidates cached keys: keys rotated under one table are wrong under the
    other, so a decode that grows past the switch (original_max_position_embeddings for longrope,
    max_position_embeddings for dynamic) must recompute its cached keys (transformers' Phi-3
    drops its cache and prefills again). transformers' dynamic is stateful, keeping the longest
    table seen until a sequence shorter than M resets it; this function is pure and gives what a
    freshly loaded transformers model gives.
    """
    if not isinstance(rope, RopeConfig):
        raise ValueError(f"rope={rope!r}; expected a RopeConfig")
    if not is_int(head_dim) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r}; expected a positive even int")
    head_dim = int(head_dim)
    if seq_len is not None and jnp.ndim(seq_len) != 0:
        raise ValueError(f"seq_len has shape {jnp.shape(seq_len)}; expected a scalar int or None")
    kind = rope.rope_type
    if kind == "proportional":
        return _proportional(rope, head_dim), 1.0
    dim = int(head_dim * rope.partial_rotary_factor)  # truncates, as transformers does
    if dim < (4 if kind == "dynamic" else 2) or dim % 2:
        raise ValueError(f"rope.partial_rotary_factor={rope.partial_rotary_factor} with head_dim="
                         f"{head_dim} gives rotary_dim={dim}; expected an even rotary_dim >= "
                         f"{4 if kind == 'dynamic' else 2}")
    if kind == "default":
        return jnp.asarray(_default(rope.theta, dim)), 1.0
    if kind == "linear":
        return jnp.asarray(_default(rope.theta, dim) / _f32(rope.factor)), 1.0
    if kind == "dynamic":
        return _dynamic(rope, dim, seq_len), 1.0
    if kind == "yarn":
        return _yarn(rope, dim)
    if kind == "longrope":
        return _longrope(rope, dim, seq_len)
    if kind == "llama3":
        return _llama3(rope, dim), 1.0
    raise ValueError(f"rope.rope_type={kind!r} has no frequencies here")  # RopeConfig checks it


# Static tables are computed on the host in NumPy float32, mirroring torch operation by operation
# (so they agree bit for bit): pow correctly rounded (through float64), `tensor / scalar` a true
# division, `scalar / tensor` torch's reciprocal-then-multiply. (XLA would turn a division by a
# scalar into a multiplication by its reciprocal, one ulp off.)

def _f32(value):
    return np.float32(value)


def _exponents(dim: int, denominator: int | None = None) -> np.ndarray:
    """2i / dim for i < dim / 2: int arange, then float32, as transformers."""
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / _f32(denominator or dim)


def _pow(base: float, exponents: np.ndarray) -> np.ndarray:
    return (np.float64(_f32(base)) ** exponents.astype(np.float64)).astype(np.float32)


def _rdiv(scalar: float, x: np.ndarray) -> np.ndarray:
    """torch's `scalar / tensor`: the reciprocal, times the scalar."""
    return (_f32(1.0) / x) * _f32(scalar)


def _default(theta: float, dim: int) -> np.ndarray:
    return _rdiv(1.0, _pow(theta, _exponents(dim)))


def _dynamic(rope: RopeConfig, dim: int, seq_len):
    original = jnp.asarray(_default(rope.theta, dim))
    if seq_len is None:
        return original
    M, factor = rope.max_position_embeddings, rope.factor
    length = jnp.maximum(jnp.asarray(seq_len), M).astype(_F32)
    # float32 throughout, as transformers' forward (seq_len there is a tensor).
    theta = rope.theta * ((factor * length / M) - (factor - 1)) ** (dim / (dim - 2))
    scaled = 1.0 / (theta ** jnp.asarray(_exponents(dim)))
    # transformers recomputes only when the length passes M; below it keeps the original table.
    return jnp.where(jnp.asarray(seq_len) > M, scaled, original)


def _resolved_factor(rope: RopeConfig) -> float:
    """yarn/longrope: factor, or max_position_embeddings / original when it is None."""
    if rope.factor is not None:
        return rope.factor
    return rope.max_position_embeddings / rope.original_max_position_embeddings


def _yarn(rope: RopeConfig, dim: int):
    factor, theta = _resolved_factor(rope), rope.theta
    original = rope.original_max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        # transformers tests truthiness: mscale=0 or a lone mscale falls back to mscale(factor).
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):  # the dim whose wavelength fits `rotations` times in original
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - _f32(low)) / _f32(high - low), 0, 1)
    extrapolation = _f32(1) - ramp  # weight of the unscaled frequency
    pos_freqs = _pow(theta, _exponents(dim))
    interpolated, extrapolated = _rdiv(1.0, _f32(factor) * pos_freqs), _rdiv(1.0, pos_freqs)
    inv_freq = interpolated * (_f32(1) - extrapolation) + extrapolated * extrapolation
    return jnp.asarray(inv_freq), float(attention_factor)


def _longrope(rope: RopeConfig, dim: int, seq_len):
    original = rope.original_max_position_embeddings
    if len(rope.short_factor) != dim // 2:
        raise ValueError(f"rope.short_factor has {len(rope.short_factor)} entries; expected "
                         f"rotary_dim // 2 = {dim // 2}")
    factor = _resolved_factor(rope)
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = (1.0 if factor <= 1.0
                            else math.sqrt(1 + math.log(factor) / math.log(original)))
    powers = _pow(rope.theta, _exponents(dim))
    short = jnp.asarray(_rdiv(1.0, np.asarray(rope.short_factor, np.float32) * powers))
    if seq_len is None:
        return short, float(attention_factor)
    long = jnp.asarray(_rdiv(1.0, np.asarray(rope.long_factor, np.float32) * powers))
    return jnp.where(jnp.asarray(seq_len) > original, long, short), float(attention_factor)


def _llama3(rope: RopeConfig, dim: int):
    inv_freq = _default(rope.theta, dim)
    factor, low, high = _f32(rope.factor), rope.low_freq_factor, rope.high_freq_factor
    original = rope.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = _f32(original / low), _f32(original / high)
    wavelen = _rdiv(2 * math.pi, inv_freq)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (_rdiv(original, wavelen) - _f32(low)) / _f32(high - low)
    smoothed = (_f32(1) - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return jnp.asarray(np.where(is_medium, smoothed, scaled))


def _proportional(rope: RopeConfig, head_dim: int):
    rotated = int(rope.partial_rotary_factor * head_dim // 2)  # pairs that rotate
    inv_freq = _rdiv(1.0, _pow(rope.theta, _exponents(2 * rotated, head_dim)))
    inv_freq = np.concatenate([inv_freq, np.zeros(head_dim // 2 - rotated, np.float32)])
    return jnp.asarray(inv_freq / _f32(1.0 if rope.factor is None else rope.factor))


def apply_rope(x, positions, inv_freq, attention_factor=1.0, *, layout="half"):
    """Rotates feature pairs of x by position.

    x [B, T, H, D]; positions [B, T] int; inv_freq [R/2] float32 with R <= D. The leading R
    features rotate and the other D - R pass through unchanged (partial rotary, as transformers'
    GPT-NeoX and Phi); the rotated ones are scaled by attention_factor (a float, or a scalar).

    layout="half" pairs feature i with i + R/2 (Llama/HF "rotate_half"); "interleaved" pairs
    2i with 2i+1 (GPT-J, Meta's original Llama). Angles are float32 whatever x's dtype.
    inv_freq None returns x unchanged (a layer without RoPE; see `lcm.model.rope_tables`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {list(LAYOUTS)}")
    if inv_freq is None:
        return x
    inv_freq = jnp.asarray(inv_freq)
    rotary = 2 * inv_freq.shape[-1] if inv_freq.ndim == 1 else 0
    if not 0 < rotary <= x.shape[-1]:
        raise ValueError(f"inv_freq has shape {inv_freq.shape} but x has head_dim {x.shape[-1]}; "
                         f"expected a 1-D inv_freq with 1 to head_dim // 2 entries")
    # float32: bf16 positions cannot tell 257 from 256, and angles of large positions need it.
    positions = jnp.asarray(positions).astype(_F32)
    angles = positions[..., None] * inv_freq.astype(_F32).reshape((1,) * positions.ndim + (-1,))
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    xf = x[..., :rotary].astype(_F32)
    if layout == "half":
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    out = out.astype(x.dtype)
    return out if rotary == x.shape[-1] else jnp.concatenate([out, x[..., rotary:]], axis=-1)
