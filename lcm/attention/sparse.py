"""Sparse attention masks estimated from q and k at run time (MInference, FlexPrefill, Seer).

Each estimator looks at cheap statistics of the attention matrix and returns a mask value that
drives `attend(..., impl="xla")` (and the kernels) through `mask_layout`:

  * `estimate_vertical_slash` -> `VerticalSlash`: MInference's vertical-slash index estimate
    from the scores of the last queries (key columns every query reads, diagonals it reads).
  * `estimate_block_topk` -> `BlockMask`: block scores from mean-pooled q and k (FlexPrefill's
    query-aware estimate, SeerAttention's gate without the learned projections), kept by top-k
    or by cumulative-mass coverage.
  * `top_k_blocks`: the generic per-row top-k of a score grid, as a bool grid.

Every function is pure and jit-safe: budgets are static Python ints, so output shapes never
depend on data, and arguments are checked (ValueError) before anything is traced. The masks have
no batch dimension (one pattern per head for the whole batch): statistics are summed over the
batch before selection, so a pattern serves every example of the call.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcm.attention.data_masks import BlockMask, VerticalSlash
from lcm.checks import check_int

f32 = jnp.float32

# MInference's vertical-slash estimate scores the last 64 queries and always keeps the first 30
# key columns (attention sinks) and the 100 nearest diagonals (local window); its per-head
# fallback budget, when no searched pattern is configured, is 1000 columns and 6096 diagonals.
_MINFERENCE_LAST_Q = 64
_MINFERENCE_VERTICAL = 1000
_MINFERENCE_SLASH = 6096
_MINFERENCE_SINK_COLUMNS = 30
_MINFERENCE_LOCAL_DIAGONALS = 100


def top_k_blocks(scores, k: int):
    """The `k` largest entries of each row, as a bool grid. scores [..., nq, nk] float -> bool.

    Ties go to the lower column index (deterministic). Entries that are -inf (or NaN) are never
    selected, so a row with fewer than `k` finite scores keeps fewer than `k` entries; use -inf
    for cells that must not be chosen (e.g. causally unreachable blocks).
    """
    _check_scores(scores)
    nk = scores.shape[-1]
    _check_int("top_k_blocks", "k", k, 0, nk, f"the number of columns ({nk})")
    return _top_k_blocks(scores, k)


@functools.partial(jax.jit, static_argnums=1)
def _top_k_blocks(scores, k):
    scores = scores.astype(jnp.promote_types(scores.dtype, f32))
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    # Rank of every entry in a stable descending sort: lower index first among equals.
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    return (rank < k) & (scores > -jnp.inf)


def estimate_vertical_slash(q, k, *, last_q: int = _MINFERENCE_LAST_Q,
                            num_vertical: int | None = None, num_slash: int | None = None,
                            always_vertical: int | None = None, always_slash: int | None = None,
                            scale: float | None = None) -> VerticalSlash:
    """MInference's vertical-slash estimate: per head, the key columns and diagonals that the last
    `last_q` queries attend to most.

    q [B, T, H, D]; k [B, S, K, D] with H a multiple of K (query head h reads KV head h // (H/K));
    queries sit at the end of the keys (query row i at key position i + S - T), as in `attend`.
    The softmax (float32, causal) of the last `last_q` queries against every key is summed over
    those queries and the batch: by key column -> the top `num_vertical` columns; along each
    diagonal (offset = query position - key position, 0..S-1) -> the top `num_slash` offsets.
    The mask has no batch dimension, so the batch shares one pattern per head (its summed
    scores). Memory: B * H * last_q * S float32 scores.

    Defaults: `last_q` 64 as MInference. Budgets default to MInference's fallback of 1000
    columns and 6096 diagonals per head, clipped to S (so short inputs get a dense pattern). The
    first `always_vertical` columns (attention sinks) and the
    `always_slash` nearest diagonals (offsets 0.., the local window) are always kept and count in
    the budgets: by default min(30, budget // 4) columns and min(100, budget // 4) diagonals,
    and at least one of each (column 0; offset 0, so every query sees itself). At MInference's
    budgets that is exactly its 30 sinks and 100 local diagonals; at small budgets most of the
    budget is still estimated.

    Returns VerticalSlash(vertical_idx [H, num_vertical] int32 key positions, ascending;
    slash_offsets [H, num_slash] int32 offsets, ascending).
    """
    _, T, _, D, S, _ = _check_qk("estimate_vertical_slash", q, k)
    fn = "estimate_vertical_slash"
    _check_int(fn, "last_q", last_q, 1, T, f"q_len ({T})")
    num_vertical = min(_MINFERENCE_VERTICAL, S) if num_vertical is None else num_vertical
    num_slash = min(_MINFERENCE_SLASH, S) if num_slash is None else num_slash
    _check_int(fn, "num_vertical", num_vertical, 0, S, f"kv_len ({S})")
    _check_int(fn, "num_slash", num_slash, 0, S, f"kv_len ({S})")
    if always_vertical is None:
        always_vertical = _default_forced(num_vertical, _MINFERENCE_SINK_COLUMNS)
    if always_slash is None:
        always_slash = _default_forced(num_slash, _MINFERENCE_LOCAL_DIAGONALS)
    _check_int(fn, "always_vertical", always_vertical, 0, num_vertical,
               f"num_vertical ({num_vertical})")
    _check_int(fn, "always_slash", always_slash, 0, num_slash, f"num_slash ({num_slash})")
    scale = _check_scale(fn, scale, D)

    vertical_idx, slash_offsets = _vertical_slash(q, k, last_q, num_vertical, num_slash,
                                                  always_vertical, always_slash, scale)
    return VerticalSlash(vertical_idx, slash_offsets)


def estimate_block_topk(q, k, *, block_size: int, k_blocks: int | None = None,
                        coverage: float | None = None, scale: float | None = None,
                        causal: bool = True) -> BlockMask:
    """Block-sparse estimate from mean-pooled q and k (FlexPrefill / SeerAttention-style).

    q [B, T, H, D]; k [B, S, K, D] with H a multiple of K; queries sit at the end of the keys.
    q and k are averaged over blocks of `block_size` tokens (a short last block over its real
    tokens); block logits are pooled_q . pooled_k * scale (+ log of the key block's token count,
    so a short last key block weighs by its size), and a float32 softmax over the key blocks
    (causal at block level if `causal`: key blocks starting after the query block's last
    position get nothing) gives each (head, query block) a distribution over key blocks. The
    mask has no batch dimension: the distributions are averaged over the batch.

    Per (head, query block), the kept key blocks are either the top `k_blocks`, or with
    `coverage` in (0, 1] the smallest set whose probability mass reaches `coverage` (FlexPrefill's
    gamma, e.g. 0.9; at most `k_blocks` blocks when both are given). The diagonal block(s) (key
    blocks holding the query block's own positions) and the first key block are always kept and
    are chosen first, so they count in the budget; a row never keeps fewer than them, and every
    causal row sees its own position and the first (sink) key.

    Returns BlockMask(blocks [H, ceil(T/bs), ceil(S/bs)] bool, block_size). The grid is not
    causal inside blocks: combine with `Causal()` (`mask & Causal()`) for causal attention.
    """
    _, _, _, D, S, _ = _check_qk("estimate_block_topk", q, k)
    fn = "estimate_block_topk"
    _check_int(fn, "block_size", block_size, 1, None, "")
    nkb = -(-S // block_size)
    if k_blocks is None and coverage is None:
        raise ValueError(f"{fn}: pass k_blocks (an int in [1, {nkb}]) or coverage (a float in "
                         f"(0, 1]), or both")
    if k_blocks is not None:
        _check_int(fn, "k_blocks", k_blocks, 1, nkb,
                   f"the number of key blocks ceil({S}/{block_size}) = {nkb}")
    if coverage is not None and (isinstance(coverage, (bool, np.bool_))
                                 or not isinstance(coverage, (int, float, np.integer, np.floating))
                                 or not 0.0 < coverage <= 1.0):
        raise ValueError(f"{fn}(coverage={coverage!r}); expected a float in (0, 1]")
    if not isinstance(causal, bool):
        raise ValueError(f"{fn}(causal={causal!r}); expected True or False")
    scale = _check_scale(fn, scale, D)

    blocks = _block_topk(q, k, block_size, k_blocks,
                         None if coverage is None else float(coverage), scale, causal)
    return BlockMask(blocks, block_size)


# The estimators proper are jitted with their static budgets: one compiled computation when
# called eagerly, inlined when called inside a caller's jit.
@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _vertical_slash(q, k, last_q, num_vertical, num_slash, always_vertical, always_slash, scale):
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    L, G = last_q, H // K
    qg = q[:, T - L:].reshape(B, L, K, G, D)
    s = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=f32).reshape(B, H, L, S)
    qpos = jnp.arange(S - L, S)
    causal = jnp.arange(S)[None, :] <= qpos[:, None]  # [L, S]; each row sees key 0 at least
    p = jax.nn.softmax(jnp.where(causal[None, None], s * scale, -jnp.inf), axis=-1)
    p = p.sum(0)  # [H, L, S]: the batch shares one pattern

    vertical = p.sum(1)  # [H, S]
    slash = _diagonal_sums(p)  # [H, S], index = query position - key position
    vertical_idx = _top_indices(vertical, num_vertical, always_vertical)
    slash_offsets = _top_indices(slash, num_slash, always_slash)
    return vertical_idx, slash_offsets


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _block_topk(q, k, block_size, k_blocks, coverage, scale, causal):
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    nqb, nkb = -(-T // block_size), -(-S // block_size)
    G = H // K
    pq, _ = _block_means(q, block_size)  # [B, nqb, H, D]
    pk, k_counts = _block_means(k, block_size)  # [B, nkb, K, D], [nkb]
    pq = pq.reshape(B, nqb, K, G, D)
    logits = jnp.einsum("bikgd,bjkd->bkgij", pq, pk, preferred_element_type=f32)
    logits = logits.reshape(B, H, nqb, nkb) * scale + jnp.log(k_counts)[None, None, None, :]

    # Block geometry in key coordinates: query block i holds positions [qlo, qhi].
    offset = S - T
    qlo = jnp.arange(nqb)[:, None] * block_size + offset
    qhi = jnp.minimum(qlo + block_size, T + offset) - 1
    klo = jnp.arange(nkb)[None, :] * block_size
    khi = jnp.minimum(klo + block_size, S) - 1
    allowed = (klo <= qhi) if causal else jnp.ones((nqb, nkb), bool)
    forced = ((klo <= qhi) & (khi >= qlo)) | (klo == 0)  # diagonal block(s) and the first

    logits = jnp.where(allowed[None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).mean(0)  # [H, nqb, nkb]: batch shares one grid
    # Forced blocks first, then by probability; unreachable blocks never.
    priority = jnp.where(forced[None], jnp.inf, jnp.where(allowed[None], probs, -jnp.inf))
    if coverage is None:
        keep = top_k_blocks(priority, k_blocks)
    else:
        keep = _coverage_blocks(priority, probs, coverage, k_blocks)
    return keep | forced[None]


def _coverage_blocks(priority, probs, coverage, max_blocks):
    """Per row, the smallest prefix of the `priority` order whose `probs` mass reaches coverage.

    A static sort over all key blocks + cumulative sum + threshold, so shapes never depend on
    the data; `max_blocks` (optional) caps the prefix.
    """
    order = jnp.argsort(-priority, axis=-1, stable=True)
    mass = jnp.take_along_axis(probs, order, axis=-1)
    before = jnp.cumsum(mass, axis=-1) - mass  # mass of the blocks ranked ahead
    reachable = jnp.take_along_axis(priority, order, axis=-1) > -jnp.inf
    keep_sorted = (before < coverage) & reachable
    if max_blocks is not None:
        ranks = jnp.arange(priority.shape[-1]).reshape((1,) * (priority.ndim - 1) + (-1,))
        keep_sorted &= ranks < max_blocks
    rank = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(keep_sorted, rank, axis=-1)


def _block_means(x, block_size):
    """[B, L, N, D] -> per-block means [B, ceil(L/bs), N, D] float32 and token counts [nb]."""
    B, L, N, D = x.shape
    nb = -(-L // block_size)
    x = jnp.pad(x.astype(f32), ((0, 0), (0, nb * block_size - L), (0, 0), (0, 0)))
    sums = x.reshape(B, nb, block_size, N, D).sum(2)
    counts = jnp.minimum(block_size, L - jnp.arange(nb) * block_size).astype(f32)
    return sums / counts[None, :, None, None], counts


def _diagonal_sums(p):
    """p [H, L, S], the scores of the last L queries (query i at key position S - L + i) ->
    [H, S] sums along diagonals: out[d] = sum_i p[i, S - L + i - d].

    Skew by reshaping, not scattering: reversing the keys puts diagonal d of row i at column
    d + L - 1 - i; padding rows to S + L and re-reading them S + L - 1 wide shifts row i right by
    i, so every diagonal lands in one column (the wrapped cells are padding zeros).
    """
    H, L, S = p.shape
    rev = jnp.pad(p[..., ::-1], ((0, 0), (0, 0), (0, L)))  # [H, L, S + L]
    flat = rev.reshape(H, L * (S + L))[:, :L * (S + L - 1)]
    skewed = flat.reshape(H, L, S + L - 1)
    return skewed.sum(1)[:, L - 1:L - 1 + S]


def _top_indices(scores, n, forced):
    """The `n` best indices per row of scores [H, S], the first `forced` indices always among
    them; ascending int32 [H, n]. Ties go to the lower index."""
    scores = jnp.where(jnp.arange(scores.shape[-1])[None] < forced, jnp.inf, scores)
    _, idx = lax.top_k(scores, n)  # stable: equal scores keep index order
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def _default_forced(budget, cap):
    """MInference's count (cap) at its budgets; a quarter of small budgets; >= 1 if any."""
    return min(cap, max(budget // 4, min(budget, 1)))


def _check_qk(fn, q, k):
    for name, x in (("q", q), ("k", k)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{fn}: {name} has shape {getattr(x, 'shape', None)}; expected 4 "
                             f"dims [batch, length, heads, head_dim]")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{fn}: {name}.dtype={x.dtype}; expected a float dtype")
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    if min(B, T, H, D, S, K) == 0:
        raise ValueError(f"{fn}: empty dimension in q {tuple(q.shape)} or k {tuple(k.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{fn}: k shape {tuple(k.shape)} does not fit q shape {tuple(q.shape)}:"
                         f" batch and head_dim must match")
    if H % K:
        raise ValueError(f"{fn}: q has {H} heads, not a multiple of the {K} KV heads of k")
    if T > S:
        raise ValueError(f"{fn}: q_len={T} > kv_len={S}; queries are aligned to the end of the "
                         f"keys, so q_len may not exceed kv_len")
    return B, T, H, D, S, K


def _check_int(fn, name, value, lo, hi, hi_desc):
    check_int(fn, name, value, lo, hi, call=True, why=hi_desc)


def _check_scale(fn, scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(
            scale, (int, float, np.integer, np.floating)) or not 0 < scale < math.inf:
        raise ValueError(f"{fn}(scale={scale!r}); expected a positive float or None "
                         f"(1/sqrt(head_dim))")
    return float(scale)


def _check_scores(scores):
    if getattr(scores, "ndim", 0) < 2 or not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"top_k_blocks: scores shape {getattr(scores, 'shape', None)}, dtype "
                         f"{getattr(scores, 'dtype', None)}; expected a float array "
                         f"[..., q_blocks, k_blocks]")
