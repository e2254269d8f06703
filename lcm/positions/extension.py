"""Training-free context extension beyond RoPE scaling: Self-Extend, ReRoPE, ALiBi, NoPE.

Self-Extend and (leaky) ReRoPE score a query-key pair with one of two rotations, chosen by the
distance d = query index - key index: d < window uses the normal RoPE pair (q1, k1), d >= window
another pair (q2, k2). Softmax runs over the merged scores. Nothing [T, S] is materialised: two
blockwise passes, one over `Local(window)` with (q1, k1) and one over `FarCausal(window)` with
(q2, k2) (each `&` the model's mask), give partial outputs and logsumexps that merge exactly;
the backward pass reruns the blockwise backward of each pass against the merged output and
logsumexp (the ring-attention identity), so gradients are exact too and memory stays
O(seq * block). `impl="reference"` merges dense score matrices instead (the ground truth).

ALiBi attends with unrotated q and k and `attend(..., alibi_slopes=alibi_slopes(H))`: the xla
and pallas backends build the bias per block, no [T, S] array (the ring backends raise). NoPE
attends with unrotated q and k.

The window split and ALiBi's distance use row indices (query i + S - T vs key j), the rotations
use `positions`: they agree for the default positions and inside packed segments (positions
restart per segment, and `Document` keeps attention within it), not for position ids with gaps
(PoSE-style skipped positions), which only the RoPE types follow.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lcm.attention import Causal, Local, attend, mask_layout
from lcm.attention.blockwise import attention_backward, attention_with_lse
from lcm.attention.pallas import (default_platform, pallas_attention_backward,
                                  pallas_attention_with_lse)
from lcm.attention.masks import IndexMask, Mask, causal_bounds, positive_int, group_heads
from lcm.checks import check_int
from lcm.config import PositionConfig
from lcm.positions.rope import apply_rope

f32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FarCausal(IndexMask):
    """Causal keys at distance >= window: a query at p sees keys 0 .. p - window.

    The complement of `Local(window)` within `Causal()`.
    """

    window: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        positive_int("FarCausal", "window", self.window)

    def fn(self, qpos, k):
        return k <= qpos - self.window

    def block_bounds(self, qlo, qhi, klo, khi):
        return causal_bounds(qlo - self.window, qhi - self.window, klo, khi)


# ---------------------------------------------------------------------------- position maps


def self_extend_positions(positions, window: int, group_size: int):
    """Self-Extend's grouped positions: `(query [B, T] float32, key [B, T] int32)`.

    key = floor(pos / g); query = floor(pos / g) + window - window / g, as LongLM's code (a true
    division: fractional when g does not divide window), so a grouped distance at d = window
    continues the neighbour distances.
    """
    grouped = positions // group_size
    return grouped.astype(f32) + (window - window / group_size), grouped


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes [H] float32: 2^(-8 i / H), i = 1..H, for a power-of-two H; else
    those of the nearest lower power of two n, then every other slope of 2n (Press et al.'s
    reference code)."""
    check_int(None, "num_heads", num_heads, 1)
    num_heads = int(num_heads)

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(n)
    if n < num_heads:
        slopes += power_of_two(2 * n)[0::2][: num_heads - n]
    return np.asarray(slopes, np.float32)


def _rotated_pairs(q, k, positions, inv_freq, attention_factor, cfg: PositionConfig):
    """(q1, k1, q2, k2): the near and far rotations of Self-Extend / ReRoPE / leaky ReRoPE."""
    rope = functools.partial(apply_rope, inv_freq=inv_freq, attention_factor=attention_factor)
    w = cfg.window
    if cfg.log_scale_length is not None:
        factor = jnp.log(positions.astype(f32) + 1.0) / math.log(cfg.log_scale_length)
        q = (q.astype(f32) * jnp.maximum(factor, 1.0)[:, :, None, None]).astype(q.dtype)
    q1, k1 = rope(q, positions), rope(k, positions)
    if cfg.type == "self_extend":
        q_pos, k_pos = self_extend_positions(positions, w, cfg.group_size)
        return q1, k1, rope(q, q_pos), rope(k, k_pos)
    if cfg.type == "rerope":  # query at the window, keys at 0: every far distance reads `window`
        return q1, k1, rope(q, jnp.full_like(positions, w)), rope(k, jnp.zeros_like(positions))
    # leaky: frequencies / leak; query at pos + w (leak - 1), keys at pos.
    pos = positions.astype(f32)
    return q1, k1, rope(q, pos / cfg.leak + (w - w / cfg.leak)), rope(k, pos / cfg.leak)


def position_attention(q, k, v, *, positions, inv_freq, attention_factor, mask, position,
                       impl="auto", block_q=512, block_k=512):
    """Attention under a non-default PositionConfig. q [B, T, H, D], k, v [B, S, K, D], all
    unrotated; positions [B, T] (T == S); mask: the model's mask (Causal, Local, & Document).
    Returns [B, T, H, D]."""
    if not isinstance(position, PositionConfig):
        raise ValueError(f"position={position!r}; expected a PositionConfig")
    kind = position.type
    if kind == "rope":
        q, k = (apply_rope(x, positions, inv_freq, attention_factor) for x in (q, k))
        return attend(q, k, v, mask, impl=impl, block_q=block_q, block_k=block_k)
    if kind == "nope":
        return attend(q, k, v, mask, impl=impl, block_q=block_q, block_k=block_k)
    if kind == "alibi":
        return attend(q, k, v, Causal() if mask is None else mask, impl=impl, block_q=block_q,
                      block_k=block_k, alibi_slopes=alibi_slopes(q.shape[2]))
    mask = Causal() if mask is None else mask
    q1, k1, q2, k2 = _rotated_pairs(q, k, positions, inv_freq, attention_factor, position)
    near, far = mask & Local(position.window), mask & FarCausal(position.window)
    return merged_attention(q1, k1, q2, k2, v, near, far, impl=impl, block_q=block_q,
                            block_k=block_k)


# ---------------------------------------------------------------------------- dense paths


def _dense_scores(q, k, scale):
    """[B, T, H, D] x [B, S, K, D] -> float32 [B, K, G, T, S]."""
    B, T, H, D = q.shape
    K = k.shape[2]
    qg = q.astype(f32).reshape(B, T, K, H // K, D)
    return jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(f32),
                      precision=jax.lax.Precision.HIGHEST) * scale


def _dense_softmax_out(s, vis, v, out_shape, dtype):
    """Softmax of s [B, K, G, T, S] over the visible keys, times v; empty rows give zeros."""
    s = jnp.where(vis, s, -jnp.inf)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = p.sum(-1, keepdims=True)
    w = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", w, v.astype(f32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(out_shape).astype(dtype)


def _visibility(mask, T, S, K):
    vis = mask.prepare(T, S).visible(jnp.arange(T), jnp.arange(S), S - T)
    return group_heads(vis, K)


def _dense_merged(q1, k1, q2, k2, v, near, far, scale):
    """The definition: per pair the score of the pass whose mask holds it; one softmax."""
    T, S, K = q1.shape[1], k1.shape[1], k1.shape[2]
    vis1, vis2 = _visibility(near, T, S, K), _visibility(far, T, S, K)
    s = jnp.where(vis1, _dense_scores(q1, k1, scale), _dense_scores(q2, k2, scale))
    return _dense_softmax_out(s, vis1 | vis2, v, q1.shape, q1.dtype)


# ---------------------------------------------------------------------------- two-pass merge


def merged_attention(q1, k1, q2, k2, v, near: Mask, far: Mask, *, impl="auto", scale=None,
                     block_q=512, block_k=512):
    """One softmax over two disjoint key sets scored by different (q, k) pairs.

    Pairs visible under `near` score q1 . k1, pairs under `far` score q2 . k2 (the masks must
    not overlap). q1, q2 [B, T, H, D]; k1, k2, v [B, S, K, D]. impl "reference" is dense; "xla"
    runs two blockwise passes and "pallas" two block-sparse kernel passes (each visiting only
    its mask's blocks), merged by logsumexp, forward and backward; "auto" is "pallas" on a TPU
    or GPU, else "xla".
    """
    if impl not in _MERGED_IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {list(_MERGED_IMPLS)}")
    D = q1.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if impl == "auto":
        impl = "pallas" if default_platform() != "interpret" else "xla"
    if impl == "reference":
        return _dense_merged(q1, k1, q2, k2, v, near, far, scale)
    B, T, H, _ = q1.shape
    S, K = k1.shape[1], k1.shape[2]
    if impl == "pallas":
        # As attend: blocks clipped to the lengths rounded up to the TPU tile multiples.
        cfg = _PallasPasses(scale, min(block_q, -(-T // 8) * 8), min(block_k, -(-S // 128) * 128))
        return _merged_pallas(cfg, q1, k1, q2, k2, v, near.prepare(T, S), far.prepare(T, S))
    bq, bk = min(block_q, T), min(block_k, S)
    lay1 = mask_layout(near, T, S, bq, bk, num_heads=H, num_kv_heads=K).shared()
    lay2 = mask_layout(far, T, S, bq, bk, num_heads=H, num_kv_heads=K).shared()
    lay1, lay2 = (jax.tree.map(jnp.asarray, lay) for lay in (lay1, lay2))
    return _merged(q1, k1, q2, k2, v, near.prepare(T, S), far.prepare(T, S), lay1, lay2,
                   scale, K)


def _merge(o1, l1, o2, l2):
    """Merges two partial softmax outputs by their logsumexps ([B, T, H, 1]; +inf: empty row).

    Returns (out [B, T, H, D] float32, lse [B, T, H, 1], +inf where both passes were empty)."""
    l1 = jnp.where(jnp.isposinf(l1), -jnp.inf, l1)
    l2 = jnp.where(jnp.isposinf(l2), -jnp.inf, l2)
    lse = jnp.logaddexp(l1, l2)
    seen = jnp.isfinite(lse)
    ref = jnp.where(seen, lse, 0.0)
    out = jnp.exp(l1 - ref) * o1.astype(f32) + jnp.exp(l2 - ref) * o2.astype(f32)
    return jnp.where(seen, out, 0.0), jnp.where(seen, lse, jnp.inf)


def _merged_fwd_impl(q1, k1, q2, k2, v, near, far, lay1, lay2, scale, K):
    o1, l1 = attention_with_lse(q1, k1, v, near, lay1, scale=scale)
    o2, l2 = attention_with_lse(q2, k2, v, far, lay2, scale=scale)
    out, lse = _merge(o1, l1, o2, l2)
    return out.astype(q1.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _merged(q1, k1, q2, k2, v, near, far, lay1, lay2, scale, K):
    return _merged_fwd_impl(q1, k1, q2, k2, v, near, far, lay1, lay2, scale, K)[0]


def _merged_fwd(q1, k1, q2, k2, v, near, far, lay1, lay2, scale, K):
    out, lse = _merged_fwd_impl(q1, k1, q2, k2, v, near, far, lay1, lay2, scale, K)
    return out, (q1, k1, q2, k2, v, near, far, lay1, lay2, out, lse)


def _merged_bwd(scale, K, residuals, d_out):
    q1, k1, q2, k2, v, near, far, lay1, lay2, out, lse = residuals
    # Each pass's probabilities are exp(s - merged lse), and delta = d_out . merged out: the
    # blockwise backward of each pass then gives the gradient of the merged softmax.
    dq1, dk1, dv1 = attention_backward(q1, k1, v, near, lay1, out, lse, d_out, scale=scale)
    dq2, dk2, dv2 = attention_backward(q2, k2, v, far, lay2, out, lse, d_out, scale=scale)
    return dq1, dk1, dq2, dk2, (dv1.astype(f32) + dv2.astype(f32)).astype(v.dtype), \
        None, None, None, None


_merged.defvjp(_merged_fwd, _merged_bwd)

_MERGED_IMPLS = ("auto", "reference", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class _PallasPasses:
    """Static options of the two kernel passes (hashable: custom_vjp's nondiff argument)."""

    scale: float
    block_q: int
    block_k: int

    def options(self):
        return dict(scale=self.scale, block_q=self.block_q, block_k=self.block_k)


def _merged_pallas_fwd(cfg, q1, k1, q2, k2, v, near, far):
    o1, l1 = pallas_attention_with_lse(q1, k1, v, near, **cfg.options())
    o2, l2 = pallas_attention_with_lse(q2, k2, v, far, **cfg.options())
    out, lse = _merge(o1, l1, o2, l2)
    out = out.astype(q1.dtype)
    return out, (q1, k1, q2, k2, v, near, far, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _merged_pallas(cfg, q1, k1, q2, k2, v, near, far):
    return _merged_pallas_fwd(cfg, q1, k1, q2, k2, v, near, far)[0]


def _merged_pallas_bwd(cfg, residuals, d_out):
    q1, k1, q2, k2, v, near, far, out, lse = residuals
    # As _merged_bwd: each kernel pass's backward against the merged output and logsumexp.
    dq1, dk1, dv1 = pallas_attention_backward(q1, k1, v, near, out, lse, d_out, **cfg.options())
    dq2, dk2, dv2 = pallas_attention_backward(q2, k2, v, far, out, lse, d_out, **cfg.options())
    dv = (dv1.astype(f32) + dv2.astype(f32)).astype(v.dtype)
    return dq1, dk1, dq2, dk2, dv, None, None


_merged_pallas.defvjp(_merged_pallas_fwd, _merged_pallas_bwd)
