"""Variable-length memory blocks for `RetrievedBlocks`: EM-LLM's surprise-based event boundaries
(Fountas et al. 2025), InfLLM's representative tokens, and a token-level runtime mask.

EM-LLM's rule, as its code applies it (`em_llm/attention/context_manager.py`, `update_memory`,
and `em_llm.py`, where the surprise is computed):

- the surprise at position t is -log p(x[t+1] | x[..t]), the model's own next-token loss, read
  from the logits at t (so it is unknown at the input's last token);
- every token of a chunk (here: a segment) shares one threshold, mean + gamma * std of the
  surprise of the `window` tokens just before the chunk (std with Bessel's correction, as
  torch.std; fewer than two values give no boundary, as torch's NaN does); the first chunk,
  with no past, uses its own tokens' statistics (EM-LLM's first-chunk case);
- a token whose surprise exceeds the threshold starts a new event (the code's alignment: the
  event starts at t, the token before the surprising x[t+1]), unless the current event is
  shorter than `min_size` (then the two merge, as EM-LLM's `acc_b < min_block_size` does);
  an event reaching `max_size` tokens is cut there whatever the surprise (`while acc_b >=
  max_block_size`). With no boundary at all, events are fixed blocks of `max_size`.

Graph-modularity refinement of the boundaries (EM-LLM's `similarity_refinement`, off in its
configs) is not implemented.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lcm.attention import Mask

f32 = jnp.float32


def surprise_threshold(history, history_valid, surprise, surprise_valid, gamma):
    """Per example, the threshold mean + gamma * std over the valid history [B, W] (or, where
    the history is empty, over the segment's own valid surprise [B, T]); +inf (no boundary)
    from fewer than two values."""
    has_history = history_valid.any(-1, keepdims=True)
    values = jnp.where(has_history, jnp.pad(history, ((0, 0), (0, surprise.shape[1]))),
                       jnp.pad(surprise, ((0, 0), (history.shape[1], 0))))
    valid = jnp.where(has_history, jnp.pad(history_valid, ((0, 0), (0, surprise.shape[1]))),
                      jnp.pad(surprise_valid, ((0, 0), (history.shape[1], 0))))
    n = valid.sum(-1)
    mean = jnp.where(valid, values, 0.0).sum(-1) / jnp.maximum(n, 1)
    var = jnp.where(valid, (values - mean[:, None]) ** 2, 0.0).sum(-1) / jnp.maximum(n - 1, 1)
    return jnp.where(n >= 2, mean + gamma * jnp.sqrt(var), jnp.inf)


def event_starts(divide, token_valid, run, *, min_size: int, max_size: int):
    """Which tokens start an event, streaming over the segment: (starts [B, T] bool, the open
    event's length after the segment [B] int32). divide [B, T] bool: surprise above threshold;
    token_valid [B, T]: real tokens (padding neither starts nor lengthens an event); run [B]:
    the open event's length before the segment (>= max_size before a document's first token)."""

    def step(run, xs):
        d, ok = xs
        start = ok & ((run >= max_size) | (d & (run >= min_size)))
        run = jnp.where(ok, jnp.where(start, 1, run + 1), run)
        return run, start

    run, starts = lax.scan(step, run, (divide.T, token_valid.T))
    return starts.T, run


def surprise_of(logits, next_tokens):
    """-log p(next token) [B, T] float32 from logits [B, T, V] (no gradient)."""
    logp = jax.nn.log_softmax(lax.stop_gradient(logits).astype(f32), -1)
    return -jnp.take_along_axis(logp, next_tokens[..., None], -1)[..., 0]


def last_valid(values, valid, size):
    """The last `size` valid entries of values [B, N] (order kept), left-padded: (values, valid)
    [B, size]."""
    order = jnp.argsort(valid, axis=-1, stable=True)  # invalid first, then valid in order
    take = order[:, -size:]
    return jnp.take_along_axis(values, take, -1), jnp.take_along_axis(valid, take, -1)


def block_representatives(keys, valid, block_ids, num_blocks, score=None, repr_tokens=None):
    """One key per block [B, num_blocks, K, D] float32: the mean of its valid keys, or (with
    `repr_tokens` = r and score [B, C, K]) InfLLM's: the mean of its r highest-scoring keys per
    KV head (fewer if the block has fewer tokens). keys [B, C, K, D]; valid [B, C]; block_ids
    [B, C] int in 0..num_blocks-1."""
    B, C, K, D = keys.shape
    rows = jnp.arange(B)[:, None]
    ids = jnp.where(valid, block_ids, num_blocks)  # invalid slots go to a dropped bucket
    k32 = keys.astype(f32)
    if repr_tokens is None:
        total = jnp.zeros((B, num_blocks + 1, K, D), f32).at[rows, ids].add(k32)
        count = jnp.zeros((B, num_blocks + 1), f32).at[rows, ids].add(1.0)
        return (total / jnp.maximum(count, 1.0)[..., None, None])[:, :num_blocks]
    slot = jnp.broadcast_to(jnp.arange(C)[None, :, None], (B, C, K))
    ids_k = jnp.broadcast_to(ids[..., None], (B, C, K))
    heads = jnp.arange(K)[None, None, :]
    left = jnp.where(valid[..., None], score.astype(f32), -jnp.inf)
    total = jnp.zeros((B, num_blocks + 1, K, D), f32)
    count = jnp.zeros((B, num_blocks + 1, K), f32)
    for _ in range(repr_tokens):  # r rounds of "the best remaining token of each block"
        best = jnp.full((B, num_blocks + 1, K), -jnp.inf).at[rows[..., None], ids_k, heads].max(
            left)
        is_best = (left == best[rows[..., None], ids_k, heads]) & jnp.isfinite(left)
        first = jnp.full((B, num_blocks + 1, K), C).at[rows[..., None], ids_k, heads].min(
            jnp.where(is_best, slot, C))  # ties: the earliest token
        picked = is_best & (slot == first[rows[..., None], ids_k, heads])
        total = total.at[rows, ids].add(jnp.where(picked[..., None], k32, 0.0))
        count = count.at[rows, ids].add(picked.astype(f32))
        left = jnp.where(picked, -jnp.inf, left)
    return (total / jnp.maximum(count, 1.0)[..., None])[:, :num_blocks]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenRows(Mask):
    """For each block of `block_size` query rows, the keys it may see: rows [H or 1, q_blocks,
    kv_len] bool (a BlockMask whose key side is per token). Data-dependent: the layout is
    computed inside `jit` from prefix sums, so kernel blocks with no visible key are skipped."""

    rows: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))

    is_static = False

    def validate(self, batch, num_heads, q_len, kv_len):
        want = (-(-q_len // self.block_size), kv_len)
        if (getattr(self.rows, "ndim", None) != 3 or self.rows.dtype != bool
                or tuple(self.rows.shape[1:]) != want or self.rows.shape[0] not in (1, num_heads)):
            raise ValueError(f"TokenRows rows: shape {getattr(self.rows, 'shape', None)}, dtype "
                             f"{getattr(self.rows, 'dtype', None)}; expected bool [{num_heads} or "
                             f"1, {want[0]}, {want[1]}]")

    def visible(self, q_idx, k_idx, offset):
        del offset
        qb = jnp.clip(q_idx // self.block_size, 0, self.rows.shape[1] - 1)
        kk = jnp.clip(k_idx, 0, self.rows.shape[2] - 1)
        return self.rows[:, qb][:, :, kk][None]

    def block_visibility(self, geom):
        (qlo, qhi), (klo, khi) = geom.q_ranges(), geom.k_ranges()
        r0, r1 = qlo // self.block_size, qhi // self.block_size + 1  # [nq, 1]
        c0, c1 = klo, khi + 1  # [1, nk]
        csum = jnp.pad(jnp.cumsum(jnp.cumsum(self.rows.astype(jnp.int32), 1), 2),
                       ((0, 0), (1, 0), (1, 0)))
        count = csum[:, r1, c1] - csum[:, r0, c1] - csum[:, r1, c0] + csum[:, r0, c0]
        cells = ((r1 - r0) * (c1 - c0))[None]
        return (count > 0)[None], (count == cells)[None]
