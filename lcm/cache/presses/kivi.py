"""KIVI: 2- and 4-bit asymmetric KV quantization with a full-precision residual window.

KIVI (Liu et al., 2024) quantizes keys per channel (min/max over groups of `group_size`
consecutive tokens, for every channel) and values per token (min/max over groups of
`group_size` channels of one token), asymmetrically: codes = round((x - min) / scale) with
scale = (max - min) / (2**bits - 1), x ~ codes * scale + min. The most recent tokens stay in
full precision: keys are quantized `residual_length` tokens at a time, once that many have
accumulated, and values one token at a time as it leaves the last `residual_length` tokens.
Attention at a step sees exactly what KIVI's reference code sees at that step: keys quantized
below R * floor(n / R) and values below n - R, where token n is the one being decoded.

Storage is really small: codes are bit-packed along the head dimension into uint8 (four 2-bit
or two 4-bit codes a byte), scales and minimums are stored in `scale_dtype`, and only the
residual window is kept in full precision. Reads dequantize (`kivi_read`, `kivi_attention`);
nothing is dequantized and requantized.

    state = kivi_prefill(KIVI(bits=2), k, v, lengths, capacity=4096)
    state = kivi_append(state, k_new, v_new)          # one token per example
    out = kivi_attention(q, state)                    # q [B, 1, H, D]

Composed with eviction, `KIVI(bits=2, evict=SnapKV(0.5))` first lets the scorer choose each
kv head's entries at prefill, then quantizes what it kept: each head's kept entries, in
position order, are the token sequence KIVI groups (keys carry their RoPE rotation, so attention
needs no positions), and the cache is sized by the scorer's budget, not the prompt.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcm.cache.masked_read import causal_visibility, masked_attention
from lcm.cache.presses.base import CacheFormat, Press, register
from lcm.checks import check_int, is_int
from lcm.config import dtype_name

f32 = jnp.float32
BITS = (2, 4)


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class KIVI(CacheFormat):
    """KIVI quantization settings (the reference code's k_bits = v_bits, group_size and
    residual_length). `scale_dtype` stores scales and minimums (None: the dtype of the keys).
    """

    bits: int = 2
    group_size: int = 32
    residual_length: int = 32
    scale_dtype: str | None = None
    evict: object = None

    def __post_init__(self):
        if self.evict is not None:
            if (not isinstance(self.evict, Press) or not self.evict.plain_selection
                    or self.evict.positions != "original" or self.evict.per_query_head):
                raise ValueError(f"KIVI(evict={self.evict!r}); expected None or a scoring "
                                 f"policy (Knorm, StreamingLLM, SnapKV, PyramidKV, TOVA, "
                                 f"ObservedAttention, ExpectedAttention) with positions="
                                 f"'original' and gqa 'mean' or 'max': every kv head keeps as "
                                 f"many entries, which KIVI quantizes in position order")
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise ValueError(f"KIVI(bits={self.bits!r}); expected one of {list(BITS)}")
        for name in ("group_size", "residual_length"):
            check_int("KIVI", name, getattr(self, name), 1, call=True)
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.residual_length % self.group_size:
            raise ValueError(f"KIVI(residual_length={self.residual_length}) must be a multiple "
                             f"of group_size={self.group_size}: keys are quantized a residual "
                             f"window at a time, in groups of group_size tokens")
        if self.scale_dtype is not None:
            object.__setattr__(self, "scale_dtype", dtype_name(self.scale_dtype,
                                                               "KIVI.scale_dtype"))

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            raise ValueError(f"KIVI(group_size={self.group_size}) must divide head_dim="
                             f"{head_dim}: values are quantized in groups of channels")
        if head_dim * self.bits % 8:
            raise ValueError(f"head_dim={head_dim} * bits={self.bits} must be a multiple of 8 "
                             f"to pack codes into bytes")

    def check_model(self, cfg) -> None:
        self.check_head_dim(cfg.head_dim)

    def prefill_state(self, k, v, lengths, *, capacity: int, layer):
        return kivi_prefill(self, k, v, lengths, capacity=capacity)

    def decode_layer(self, state, q, k, v, *, layer):
        state = kivi_append(state, k, v)
        return kivi_attention(q, state), state

    @classmethod
    def example(cls):
        return cls(bits=4, group_size=8, residual_length=8)

    def quantized_capacity(self, capacity: int) -> int:
        """Slots of the quantized store: every token but the last ones in full precision."""
        R = self.residual_length
        return max(R, R * ((capacity - 1) // R))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KIVIState:
    """One layer's KIVI cache. Shapes (B batch, K kv heads, Q quantized slots, D head dim,
    P = D * bits / 8 packed bytes, G group size, R residual length):

    k_codes [B, K, Q, P] uint8; k_scale, k_min [B, K, Q/G, D]   keys, per channel per G tokens
    v_codes [B, K, Q, P] uint8; v_scale, v_min [B, K, Q, D/G]   values, per token per G channels
    k_residual [B, K, R, D]: token i >= R * floor((n - 1) / R) at slot i % R
    v_residual [B, K, R + 1, D]: token i >= n - 1 - R at slot i % (R + 1)
    length [B] int32: n, the tokens stored (positions 0..n-1)
    """

    k_codes: jax.Array
    k_scale: jax.Array
    k_min: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_min: jax.Array
    k_residual: jax.Array
    v_residual: jax.Array
    length: jax.Array
    policy: KIVI = dataclasses.field(metadata=dict(static=True))
    capacity: int = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


# ----------------------------------------------------------------------------- codec


def pack_codes(codes, bits: int):
    """uint8 codes [..., D] (each < 2**bits) -> packed uint8 [..., D * bits / 8]."""
    per = 8 // bits
    grouped = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], -1, per)
    shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).reshape((1,) * (grouped.ndim - 1) + (per,))
    return (grouped << shifts).sum(-1).astype(jnp.uint8)


def unpack_codes(packed, bits: int):
    """The inverse of `pack_codes`: packed uint8 [..., P] -> codes uint8 [..., P * 8 / bits]."""
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).reshape((1,) * packed.ndim + (per,))
    codes = (packed[..., None] >> shifts) & jnp.uint8(2 ** bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def _quantize(x, bits, axis):
    """Asymmetric min/max quantization over `axis` (kept): codes uint8, scale, min (float32)."""
    x = x.astype(f32)
    lo = x.min(axis, keepdims=True)
    scale = (x.max(axis, keepdims=True) - lo) / (2 ** bits - 1)
    # A constant group has scale 0: every code is 0 and dequantizes to the exact value.
    codes = jnp.round((x - lo) / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(codes, 0, 2 ** bits - 1).astype(jnp.uint8), scale, lo


def quantize_keys(k, policy: KIVI, scale_dtype):
    """k [..., S, D] with S a multiple of group_size -> packed codes [..., S, P], scale and min
    [..., S / G, D]: per channel over groups of G consecutive tokens."""
    *lead, S, D = k.shape
    G = policy.group_size
    codes, scale, lo = _quantize(k.reshape(*lead, S // G, G, D), policy.bits, -2)
    return (pack_codes(codes.reshape(*lead, S, D), policy.bits),
            scale[..., 0, :].astype(scale_dtype), lo[..., 0, :].astype(scale_dtype))


def quantize_values(v, policy: KIVI, scale_dtype):
    """v [..., S, D] -> packed codes [..., S, P], scale and min [..., S, D / G]: per token over
    groups of G consecutive channels."""
    *lead, S, D = v.shape
    G = policy.group_size
    codes, scale, lo = _quantize(v.reshape(*lead, S, D // G, G), policy.bits, -1)
    return (pack_codes(codes.reshape(*lead, S, D), policy.bits),
            scale[..., 0].astype(scale_dtype), lo[..., 0].astype(scale_dtype))


def dequantize_keys(codes, scale, lo, policy: KIVI, dtype):
    *lead, S, _ = codes.shape
    G = policy.group_size
    c = unpack_codes(codes, policy.bits).astype(f32)
    c = c.reshape(*lead, S // G, G, c.shape[-1])
    x = c * scale.astype(f32)[..., None, :] + lo.astype(f32)[..., None, :]
    return x.reshape(*lead, S, -1).astype(dtype)


def dequantize_values(codes, scale, lo, policy: KIVI, dtype):
    *lead, S, _ = codes.shape
    G = policy.group_size
    c = unpack_codes(codes, policy.bits).astype(f32)
    c = c.reshape(*lead, S, -1, G)
    x = c * scale.astype(f32)[..., None] + lo.astype(f32)[..., None]
    return x.reshape(*lead, S, -1).astype(dtype)


# ----------------------------------------------------------------------------- cache


def _key_boundary(n, R):
    """Keys of tokens below this are quantized when the cache holds n tokens."""
    return R * (jnp.maximum(n - 1, 0) // R)


def _value_boundary(n, R):
    return jnp.maximum(n - 1 - R, 0)


def kivi_prefill(policy: KIVI, k, v, lengths, *, capacity: int) -> KIVIState:
    """The KIVI cache of a prompt. k, v [B, T, K, D] (keys after RoPE); lengths [B] int: the
    real tokens of each row (the rest is right padding); capacity: the static token capacity
    (prompt plus the tokens to be generated)."""
    B, T, K, D = k.shape
    policy.check_head_dim(D)
    if not is_int(capacity) or capacity < T:
        raise ValueError(f"capacity={capacity!r}; expected an int >= the prompt length {T}")
    R, Q = policy.residual_length, policy.quantized_capacity(capacity)
    scale_dtype = policy.scale_dtype or k.dtype
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]

    def fit(x, size):  # tokens 0..size-1, zero padded
        x = x[:, :, :size]
        return jnp.pad(x, ((0, 0), (0, 0), (0, size - x.shape[2]), (0, 0)))

    k_codes, k_scale, k_min = quantize_keys(fit(kt, Q), policy, scale_dtype)
    v_codes, v_scale, v_min = quantize_values(fit(vt, Q), policy, scale_dtype)
    n = jnp.asarray(lengths, jnp.int32)
    padded_k = fit(kt, T + R)
    k_residual = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, R, axis=1))(
        padded_k, _key_boundary(n, R))
    lo = _value_boundary(n, R)
    slots = jnp.arange(R + 1)
    tokens = lo[:, None] + (slots[None] - lo[:, None]) % (R + 1)  # [B, R + 1]
    v_residual = jnp.take_along_axis(vt, jnp.clip(tokens, 0, T - 1)[:, None, :, None], axis=2)
    return KIVIState(k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_residual, v_residual,
                     n, policy, capacity)


def kivi_append(state: KIVIState, k, v) -> KIVIState:
    """Stores one more token per row. k, v [B, K, D] (or [B, 1, K, D]). The caller keeps
    length < capacity."""
    if k.ndim == 4:
        k, v = k[:, 0], v[:, 0]
    policy = state.policy
    R, Q = policy.residual_length, state.k_codes.shape[2]
    scale_dtype = state.k_scale.dtype

    def one(st, k, v):  # arrays of one row: [K, ...]
        n = st["length"]
        # Keys: a full residual window (tokens n-R..n-1, slots 0..R-1) is quantized as a whole.
        flush = (n % R == 0) & (n > 0)
        start = jnp.clip(n - R, 0, Q - R)
        codes, scale, lo = quantize_keys(st["k_residual"], policy, scale_dtype)
        out = dict(st)
        for name, new, at, size in (("k_codes", codes, start, R),
                                    ("k_scale", scale, start // policy.group_size,
                                     R // policy.group_size),
                                    ("k_min", lo, start // policy.group_size,
                                     R // policy.group_size)):
            old = jax.lax.dynamic_slice_in_dim(st[name], at, size, axis=1)
            out[name] = jax.lax.dynamic_update_slice_in_dim(
                st[name], jnp.where(flush, new, old), at, axis=1)
        out["k_residual"] = st["k_residual"].at[:, n % R].set(k.astype(st["k_residual"].dtype))
        # Values: token n-1-R leaves the residual window (it sits in the slot token n takes).
        slot = n % (R + 1)
        moving = jax.lax.dynamic_slice_in_dim(st["v_residual"], slot, 1, axis=1)
        codes, scale, lo = quantize_values(moving, policy, scale_dtype)
        to = jnp.clip(n - 1 - R, 0, Q - 1)
        leaves = n >= R + 1
        for name, new in (("v_codes", codes), ("v_scale", scale), ("v_min", lo)):
            old = jax.lax.dynamic_slice_in_dim(st[name], to, 1, axis=1)
            out[name] = jax.lax.dynamic_update_slice_in_dim(
                st[name], jnp.where(leaves, new, old), to, axis=1)
        out["v_residual"] = st["v_residual"].at[:, slot].set(v.astype(st["v_residual"].dtype))
        out["length"] = n + 1
        return out

    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
              if not f.metadata.get("static")}
    new = jax.vmap(one)(fields, k, v)
    return dataclasses.replace(state, **new)


def kivi_read(state: KIVIState, dtype=None):
    """The dequantized cache in token order: k, v [B, K, capacity, D] and valid [B, K, capacity]
    (token i of a row is valid iff i < its length). Positions are the slot indices."""
    policy = state.policy
    R, C = policy.residual_length, state.capacity
    dtype = dtype or state.k_residual.dtype
    B, K = state.k_codes.shape[:2]
    Q = state.k_codes.shape[2]
    i = jnp.arange(C)
    n = state.length[:, None, None, None]
    kq = dequantize_keys(state.k_codes, state.k_scale, state.k_min, policy, dtype)
    vq = dequantize_values(state.v_codes, state.v_scale, state.v_min, policy, dtype)
    in_q = jnp.clip(i, 0, Q - 1)
    k = jnp.where(i[None, None, :, None] < _key_boundary(n, R), kq[:, :, in_q],
                  state.k_residual[:, :, i % R].astype(dtype))
    v = jnp.where(i[None, None, :, None] < _value_boundary(n, R), vq[:, :, in_q],
                  state.v_residual[:, :, i % (R + 1)].astype(dtype))
    valid = jnp.broadcast_to(i[None, None] < state.length[:, None, None], (B, K, C))
    return k, v, valid


def kivi_attention(q, state: KIVIState, *, scale: float | None = None):
    """Attention of the last T stored tokens' queries q [B, T, H, D] over the dequantized cache
    (each query sees the tokens up to its own). Returns [B, T, H, D]."""
    k, v, valid = kivi_read(state, q.dtype)
    T = q.shape[1]
    positions = jnp.broadcast_to(jnp.arange(state.capacity), valid.shape)
    query_positions = state.length[:, None] - T + jnp.arange(T)[None]
    visible = causal_visibility(positions, valid, query_positions)
    return masked_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), visible,
                            scale=scale)
