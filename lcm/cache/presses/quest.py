"""Quest: query-aware page selection over a full KV cache (Tang et al., 2024). Nothing is evicted.

The cache is cut into pages of `page_size` consecutive tokens; each page keeps the elementwise
minimum and maximum of its keys. At a decode step, the query bounds q.k over a page by
U = sum_d max(q_d * kmax_d, q_d * kmin_d) (Quest's sign trick), the `num_pages` pages of
largest bound are chosen, and attention reads only them. Quest's code selects per query head
(its Llama has no GQA: keys are repeated); `gqa="max"` or `"mean"` reduces the bounds over the
query heads of a KV head instead, so the heads of a group share one selection (one fetch per KV
block). Both run on the Pallas kernels: per query head, the selection is a per-head BlockMask
that the kernels evaluate in-kernel for each query head of a KV group.

The selection becomes a `BlockMask` whose cells are pages, computed inside `jit`, so the same
block-sparse machinery as everywhere else (`attend(..., impl="xla" | "pallas")`) visits only the
selected pages. Budgets follow Quest: max(3, token_budget // page_size) pages, the page holding
the newest token always among them (Quest's kernels) unless `keep_last_page=False` (Quest's
evaluation code), and the first `dense_layers` layers (and prefill) read every page.
`impl="gather"` instead copies the selected pages out of the cache and attends densely over
them: the same result without the blockwise loop (on this CPU about as fast: see
experiments/bench_cache.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lcm.attention import BlockMask, Document, attend
from lcm.attention.sparse import top_k_blocks
from lcm.cache.masked_read import masked_attention
from lcm.cache.presses.base import CacheFormat, register
from lcm.checks import check_int

f32 = jnp.float32
GQA = ("query_head", "max", "mean")
IMPLS = ("auto", "reference", "xla", "pallas", "gather")
# Quest's selection keeps at least three pages whatever the budget.
_MIN_PAGES = 3


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class Quest(CacheFormat):
    """Quest page selection: `token_budget` tokens read per decode step and query head."""

    token_budget: int = 1024
    page_size: int = 16
    dense_layers: int = 2
    keep_last_page: bool = True
    gqa: str = "query_head"
    impl: str = "auto"

    def __post_init__(self):
        for name, minimum in (("token_budget", 1), ("page_size", 1), ("dense_layers", 0)):
            check_int("Quest", name, getattr(self, name), minimum, call=True)
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.gqa not in GQA:
            raise ValueError(f"Quest(gqa={self.gqa!r}); expected one of {list(GQA)}")
        if self.impl not in IMPLS:
            raise ValueError(f"Quest(impl={self.impl!r}); expected one of {list(IMPLS)}")

    def prefill_state(self, k, v, lengths, *, capacity: int, layer):
        return quest_prefill(self, k, v, lengths, capacity=capacity)

    def decode_layer(self, state, q, k, v, *, layer):
        state = quest_append(self, state, k, v)
        out, _ = quest_attention(q, state.k, state.v, state.length, self, kmin=state.kmin,
                                 kmax=state.kmax, dense=layer < self.dense_layers)
        return out, state

    @classmethod
    def example(cls):
        return cls(token_budget=8, page_size=4, dense_layers=1)

    def num_pages(self, capacity: int) -> int:
        """Pages read per step (static): max(3, token_budget // page_size), at most all."""
        return min(max(_MIN_PAGES, self.token_budget // self.page_size),
                   -(-capacity // self.page_size))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuestState:
    """One layer's full cache with page bounds: k, v [B, C, K, D] (token i at slot i; keys after
    RoPE); kmin, kmax [B, P, K, D] float32; length [B] int32."""

    k: jax.Array
    v: jax.Array
    kmin: jax.Array
    kmax: jax.Array
    length: jax.Array

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def quest_prefill(policy: Quest, k, v, lengths, *, capacity: int) -> QuestState:
    """The cache of right-padded prompts k, v [B, T, K, D] with lengths [B]."""
    T = k.shape[1]
    if capacity < T:
        raise ValueError(f"capacity={capacity} is below the prompt length {T}")
    pad = ((0, 0), (0, capacity - T), (0, 0), (0, 0))
    n = jnp.asarray(lengths, jnp.int32)
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    kmin, kmax = page_bounds(k, n, policy.page_size)
    return QuestState(k, v, kmin, kmax, n)


def quest_append(policy: Quest, state: QuestState, k, v) -> QuestState:
    """Stores one token per row (k, v [B, K, D]) and folds its key into its page's bounds."""
    B = k.shape[0]
    rows, slot = jnp.arange(B), jnp.clip(state.length, 0, state.k.shape[1] - 1)
    kmin, kmax = update_page_bounds(state.kmin, state.kmax, k, state.length, policy.page_size)
    return QuestState(state.k.at[rows, slot].set(k.astype(state.k.dtype)),
                      state.v.at[rows, slot].set(v.astype(state.v.dtype)), kmin, kmax,
                      state.length + 1)


def page_bounds(k, lengths, page_size: int):
    """Per-page elementwise key minimum and maximum. k [B, S, K, D]; lengths [B] int (tokens
    0..length-1 are real) -> kmin, kmax [B, P, K, D] float32, P = ceil(S / page_size). Pages
    with no real token hold +inf / -inf."""
    B, S, K, D = k.shape
    P = -(-S // page_size)
    real = (jnp.arange(P * page_size)[None] < lengths[:, None])[:, :, None, None]
    kp = jnp.pad(k.astype(f32), ((0, 0), (0, P * page_size - S), (0, 0), (0, 0)))
    kmin = jnp.where(real, kp, jnp.inf).reshape(B, P, page_size, K, D).min(2)
    kmax = jnp.where(real, kp, -jnp.inf).reshape(B, P, page_size, K, D).max(2)
    return kmin, kmax


def update_page_bounds(kmin, kmax, k_new, positions, page_size: int):
    """Folds one new key per row into its page's bounds. kmin, kmax [B, P, K, D]; k_new [B, K, D];
    positions [B] int (the new token's slot). A page's first token replaces its old bounds."""
    k_new = k_new.astype(f32)

    def one(lo, hi, k, pos):
        page = pos // page_size
        fresh = pos % page_size == 0
        lo_p = jnp.where(fresh, k, jnp.minimum(lo[page], k))
        hi_p = jnp.where(fresh, k, jnp.maximum(hi[page], k))
        return lo.at[page].set(lo_p), hi.at[page].set(hi_p)

    return jax.vmap(one)(kmin, kmax, k_new, positions)


def page_scores(q, kmin, kmax, lengths, page_size: int, gqa: str = "query_head"):
    """Quest's upper bound of q.k per page. q [B, H, D] (one decode query per row); kmin, kmax
    [B, P, K, D] -> [B, H, P] (gqa="query_head") or [B, K, P] ("max", "mean"), float32, -inf
    for pages holding no real token."""
    B, H, D = q.shape
    K = kmin.shape[2]
    qg = q.astype(f32).reshape(B, K, H // K, D)
    # Empty pages hold +-inf bounds; zero them here and mask their scores below.
    lo = jnp.where(jnp.isfinite(kmin), kmin, 0.0)
    hi = jnp.where(jnp.isfinite(kmax), kmax, 0.0)
    bound = jnp.maximum(jnp.einsum("bkgd,bpkd->bkgpd", qg, hi),
                        jnp.einsum("bkgd,bpkd->bkgpd", qg, lo)).sum(-1)  # [B, K, G, P]
    if gqa == "max":
        bound = bound.max(2)
    elif gqa == "mean":
        bound = bound.mean(2)
    else:
        bound = bound.reshape(B, H, -1)
    P = kmin.shape[1]
    real = (jnp.arange(P) * page_size)[None] < lengths[:, None]  # [B, P]
    return jnp.where(real[:, None], bound, -jnp.inf)


def select_pages(scores, lengths, policy: Quest, *, capacity: int, dense=False):
    """bool [B, Hs, P]: the pages each row and selection head reads (top `num_pages` scores,
    the newest token's page forced in when `keep_last_page`). `dense` (a bool, possibly traced):
    read every real page, as Quest does in its first layers."""
    P = scores.shape[-1]
    last = ((lengths - 1) // policy.page_size)[:, None, None] == jnp.arange(P)[None, None]
    forced = last if policy.keep_last_page else jnp.zeros_like(last)
    forced = forced | dense
    scores = jnp.where(forced & jnp.isfinite(scores), jnp.inf, scores)
    chosen = top_k_blocks(scores, policy.num_pages(capacity))
    return chosen | (forced & (scores > -jnp.inf))


def quest_attention(q, k, v, lengths, policy: Quest, *, kmin=None, kmax=None, dense=False,
                    scale: float | None = None):
    """One decode step of Quest attention over a full cache.

    q [B, 1, H, D] (the query of each row's newest token, which is already in the cache);
    k, v [B, S, K, D]; lengths [B] int (tokens 0..length-1 are real); kmin, kmax [B, P, K, D]
    the page bounds (computed here when None). Returns (out [B, 1, H, D], pages bool [B, Hs, P]).
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    if T != 1:
        raise ValueError(f"quest_attention takes one decode query per row; got q_len={T} "
                         f"(prefill reads every page: use attend)")
    page = policy.page_size
    if kmin is None or kmax is None:
        kmin, kmax = page_bounds(k, lengths, page)
    scores = page_scores(q[:, 0], kmin, kmax, lengths, page, policy.gqa)
    pages = select_pages(scores, lengths, policy, capacity=S, dense=dense)
    impl = policy.impl
    if impl == "auto":
        impl = "xla" if jax.default_backend() == "cpu" else "pallas"
    if impl == "gather":
        return _gather_attention(q, k, v, lengths, pages, policy, dense, scale), pages
    G = H // K
    if policy.gqa == "query_head":
        rows, grid = q, pages[:, :, None]                       # [B, 1, H, D], [B, H, 1, P]
    else:
        # The G query heads of a KV head become G query rows of that head: one layout per KV
        # head with no grouping, which the Pallas kernels take as is.
        rows = q.reshape(B, K, G, D).transpose(0, 2, 1, 3)    # [B, G, K, D]
        grid = jnp.broadcast_to(pages[:, :, None], (B, K, -(-G // page), pages.shape[-1]))
    real = (jnp.arange(S)[None] < lengths[:, None]).astype(jnp.int32)

    def one(q1, k1, v1, grid1, real1):
        mask = BlockMask(grid1, page) & Document(jnp.ones((1, q1.shape[1]), jnp.int32), real1)
        return attend(q1, k1, v1, mask, impl=impl, scale=scale, block_q=page, block_k=page)

    out = jax.vmap(one)(rows[:, None], k[:, None], v[:, None], grid, real[:, None])[:, 0]
    if policy.gqa != "query_head":
        out = out.transpose(0, 2, 1, 3).reshape(B, 1, H, D)
    return out, pages


def _gather_attention(q, k, v, lengths, pages, policy: Quest, dense, scale):
    """impl="gather": copies the selected pages' entries out of the cache and attends densely
    over them (num_pages * page_size entries per selection head), instead of driving the
    blockwise loop with a layout. Dense steps (Quest's first layers) read the whole cache."""
    B, _, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G, page = H // K, policy.page_size
    n = policy.num_pages(S)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
    real = jnp.arange(S)[None] < lengths[:, None]                # [B, S]

    def sparse(_):
        chosen = jnp.argsort(~pages, axis=-1, stable=True)[..., :n]    # [B, Hs, n] ascending
        ok = jnp.take_along_axis(pages, chosen, axis=-1)
        tokens = (chosen[..., None] * page + jnp.arange(page).reshape(1, 1, 1, page)).reshape(
            *chosen.shape[:2], -1)
        ok = jnp.repeat(ok, page, axis=-1) & (tokens < lengths[:, None, None])
        tokens = jnp.clip(tokens, 0, S - 1)
        if policy.gqa == "query_head":  # [B, H, N] -> [B, K, G, N]
            tokens, ok = (x.reshape(B, K, G, -1) for x in (tokens, ok))
        else:                          # [B, K, N] -> [B, K, 1, N], shared by the group
            tokens, ok = tokens[:, :, None], ok[:, :, None]
        idx = tokens[..., None]
        ks = jnp.take_along_axis(kt[:, :, None], idx, axis=3)           # [B, K, G|1, N, D]
        vs = jnp.take_along_axis(vt[:, :, None], idx, axis=3)
        return _grouped_attention(q, ks, vs, ok, scale)

    def full(_):
        vis = jnp.broadcast_to(real[:, None, None], (B, K, 1, S))
        return masked_attention(q, k, v, vis, scale=scale)

    if isinstance(dense, bool):
        return full(None) if dense else sparse(None)
    return jax.lax.cond(dense, full, sparse, None)


def _grouped_attention(q, ks, vs, ok, scale):
    """q [B, 1, H, D]; ks, vs [B, K, G or 1, N, D]; ok [B, K, G or 1, N] -> [B, 1, H, D]."""
    B, _, H, D = q.shape
    K = ks.shape[1]
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(B, K, H // K, D)
    s = jnp.einsum("bkgd,bkgnd->bkgn", qg, ks, preferred_element_type=f32) * scale
    s = jnp.where(ok, s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    p = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m)), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgn,bkgnd->bkgd", p.astype(vs.dtype), vs, preferred_element_type=f32)
    return out.reshape(B, 1, H, D).astype(q.dtype)
