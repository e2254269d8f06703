"""Pure-jnp math of block-sparse flash attention, shared by the Pallas kernels (no Pallas, no lcm).

Everything here works on plain arrays, so the same functions run inside a TPU (Mosaic) or GPU
(Triton) kernel body and in the wrappers around them. Softmax statistics are float32. Shapes are
written for one block: s [..., bq, bk] logits; per-row statistics m, l [..., bq, n] with n == 1 or
lane-replicated (n == 128 on TPU, every lane holding the same value); only [..., :1] is read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32


def as_static(*values):
    """`values` with NumPy integer / floating scalars (np.int64(128), np.float32(0.125)) turned
    into Python ints / floats, so static arguments pass the checks and hash as the same
    configuration; anything else is returned unchanged for the checks to report."""
    return tuple(int(x) if isinstance(x, np.integer) else
                 float(x) if isinstance(x, np.floating) else x for x in values)


def num_blocks(length: int, block: int) -> int:
    """How many blocks of `block` cover `length` (the last one may hold padding)."""
    return -(-length // block)


def pad_axis(x, axis: int, size: int):
    """x zero-padded at the end of `axis` to `size` (a no-op when it is that long already)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def visit_kinds(kinds, blocks):
    """kinds[..., blocks]: the kind of each visited block. kinds [Lh, n, m]; blocks [Lh, n, v]."""
    return jnp.take_along_axis(jnp.asarray(kinds, jnp.int32), jnp.asarray(blocks, jnp.int32),
                               axis=-1)


def alibi_bias(slopes, q_pos, k_pos):
    """ALiBi's bias -slopes * (q_pos - k_pos), float32. slopes [..., 1, 1] float32; q_pos
    int [bq, 1] and k_pos int [1, bk] key coordinates; broadcasts to [..., bq, bk]."""
    distance = (q_pos - k_pos).astype(f32)
    slopes = jnp.asarray(slopes, f32)
    distance = distance.reshape((1,) * max(slopes.ndim - distance.ndim, 0) + distance.shape)
    return -slopes * distance


def check_alibi_slopes(alibi_slopes, num_heads: int):
    """Concrete slopes ([H] numbers, or None) as a hashable tuple of floats, else ValueError.
    Slopes are model constants: kernels keep them static and do not differentiate them."""
    if alibi_slopes is None:
        return None
    if isinstance(alibi_slopes, jax.core.Tracer):
        raise ValueError("alibi_slopes is a traced array; expected concrete slopes (a NumPy "
                         "array or a list) built outside jit: slopes are model constants and "
                         "are not differentiated")
    slopes = np.asarray(alibi_slopes)
    if slopes.shape != (num_heads,) or not np.issubdtype(slopes.dtype, np.number):
        raise ValueError(f"alibi_slopes has shape {slopes.shape} and dtype {slopes.dtype}; "
                         f"expected numbers of shape [num_heads] = [{num_heads}]")
    if not np.all(np.isfinite(slopes)):
        raise ValueError(f"alibi_slopes={slopes.tolist()}; expected finite values")
    return tuple(float(s) for s in slopes.astype(np.float32))


def check_sinks(sinks, num_heads: int):
    """Sink logits ([H] floats, or None) as a float32 array, else ValueError. Sinks are
    parameters: they may be traced, and kernels differentiate them."""
    if sinks is None:
        return None
    if getattr(sinks, "shape", None) is None or getattr(sinks, "dtype", None) is None:
        sinks = np.asarray(sinks)
    if tuple(sinks.shape) != (num_heads,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise ValueError(f"sinks has shape {tuple(sinks.shape)} and dtype {sinks.dtype}; "
                         f"expected a float array of shape [num_heads] = [{num_heads}] (one "
                         f"sink logit per query head)")
    return jnp.asarray(sinks).astype(f32)


def sink_stats(sinks, shape):
    """The online softmax's starting statistics (m, l) broadcast to `shape`: without sinks
    (None) m = -inf, l = 0 (nothing seen); with sink logits (broadcastable to `shape`) the sink
    is the first key seen, m = sink and l = exp(sink - m) = 1 (0 for a sink of -inf, which then
    counts as no sink)."""
    if sinks is None:
        return jnp.full(shape, -jnp.inf, f32), jnp.zeros(shape, f32)
    m = jnp.broadcast_to(jnp.asarray(sinks, f32), shape)
    return m, jnp.where(m == -jnp.inf, 0.0, 1.0).astype(f32)


def sink_grad(sinks, lse, delta, axis):
    """d loss / d sinks, summed over `axis`: -sum of p_sink * delta over rows, with the sink's
    softmax weight p_sink = exp(sink - lse) and delta = rowsum(dO * O). (The sink's value
    vector is zero: out = sum_j p_j v_j, so d out / d sink = -p_sink * out.) sinks broadcasts
    to lse, delta [..., rows]; rows with lse = +inf (nothing seen, no sink) give 0."""
    sinks = jnp.broadcast_to(jnp.asarray(sinks, f32), lse.shape)
    return -jnp.sum(jnp.exp(sinks - lse) * delta, axis=axis)


def check_mask_tables(mask_tables, mask_fn):
    """The tables of a head-aware mask_fn (reference.py) as a tuple of 1-D int32 arrays (empty
    for None), else ValueError."""
    if mask_tables is None:
        return ()
    if mask_fn is None:
        raise ValueError("mask_tables were given without a mask_fn to read them")
    if not isinstance(mask_tables, (tuple, list)) or not mask_tables:
        raise ValueError(f"mask_tables={type(mask_tables).__name__}; expected a non-empty tuple "
                         f"of 1-D integer arrays (or None)")
    tables = []
    for n, t in enumerate(mask_tables):
        shape, dtype = getattr(t, "shape", None), getattr(t, "dtype", None)
        if shape is None or len(shape) != 1 or shape[0] < 1 or not jnp.issubdtype(
                dtype, jnp.integer):
            raise ValueError(f"mask_tables[{n}] has shape {shape} and dtype {dtype}; expected a "
                             f"non-empty 1-D integer array")
        tables.append(jnp.asarray(t, jnp.int32))
    return tuple(tables)


def cap_logits(s, softcap: float | None):
    """(softcap * tanh(s / softcap), tanh(s / softcap)), or (s, None) without soft-capping."""
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def online_softmax_step(m_prev, l_prev, s):
    """One block of the online softmax. s [..., bq, bk] float32 with -inf where hidden.

    Returns (m_next, alpha, p, l_next): the new running max (shaped like m_prev), the factor
    alpha (like m_prev) that rescales earlier sums, p = exp(s - m_next) [..., bq, bk], and the
    new running sum (like l_prev). A row that has seen nothing keeps m = -inf and l = 0.
    """
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    # A row with nothing visible yet keeps m = -inf; shift by 0 there to avoid inf - inf.
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(s - m_safe[..., :1])
    alpha = jnp.exp(m_prev - m_safe)
    l_next = alpha * l_prev + p.sum(axis=-1, keepdims=True)
    return m_next, alpha, p, l_next


def row_seen(m):
    """Whether a row saw a key (or a sink), from its running max m: only a row that saw nothing
    keeps m = -inf. Not `l > 0`, which is False for NaN too: NaN or +inf logits make m or l NaN,
    and those rows must come out NaN, not as the zeros of a fully masked row."""
    return m != -jnp.inf


def finish_softmax(acc, m, l):
    """(out, lse [..., bq, 1]) from the accumulator acc [..., bq, D] and the row statistics.

    Rows that saw no key give out = 0 and lse = +inf, so backward's exp(s - lse) is 0, not NaN.
    A NaN that reached a row's statistics (NaN or +inf logits) stays in its output and lse.
    """
    m, l = m[..., :1], l[..., :1]
    seen = row_seen(m)
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.where(seen, acc / l_safe, 0.0)
    lse = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)
    return out, lse


def logit_grad(p, dp, delta, tanh, *, scale: float, softcap: float | None):
    """d loss / d (q k^T) for one block: p * (dp - delta), through the soft cap, times scale.

    p, dp [..., bq, bk] float32 (p = exp(s - lse), dp = dO v^T); delta [..., bq, 1] is
    rowsum(dO * O); tanh is cap_logits' second result (None without soft-capping).
    """
    ds = p * (dp - delta)
    if softcap is not None:
        ds = ds * (1.0 - tanh * tanh)
    return ds * scale
