"""Helpers shared by test files (tests/ is on sys.path via pyproject's pytest `pythonpath`)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from lcm.kernels.block_sparse.layout import FULL, PARTIAL, SKIP

# The kernel tests run the Pallas kernels interpreted (CPU); `python -m experiments.device_check`
# sets LCM_PALLAS_COMPILED=1 on a GPU / TPU so the same tests run them compiled.
INTERPRET = os.environ.get("LCM_PALLAS_COMPILED") != "1"


def random_qkv(key, B, T, S, H, K, D, dtype):
    """Standard-normal q [B, T, H, D] and k, v [B, S, K, D] in `dtype`."""
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, D), jnp.float32).astype(dtype)
    return q, k, v


def block_kinds(vis, block_q, block_k):
    """kinds int32 [1, nq, nk] from a dense [B or 1, T, S] mask, merged over the batch.

    A block is visited if any pair of any example is visible, FULL if every real pair of every
    example is (padding counts as visible: the kernels hide padding keys themselves).
    """
    vis = np.asarray(vis)
    _, T, S = vis.shape
    nq, nk = -(-T // block_q), -(-S // block_k)
    padded = np.zeros((vis.shape[0], nq * block_q, nk * block_k), bool)
    padded[:, :T, :S] = vis
    real = np.zeros((1, nq * block_q, nk * block_k), bool)
    real[:, :T, :S] = True
    blocks = padded.reshape(-1, nq, block_q, nk, block_k)
    any_ = blocks.any((0, 2, 4))
    all_ = (blocks | ~real.reshape(1, nq, block_q, nk, block_k)).all((0, 2, 4))
    return np.where(any_, np.where(all_, FULL, PARTIAL), SKIP).astype(np.int32)[None]


def merged_two_pass(fwd, bwd, q, k, v, d_out, near, far, *, block_q, block_k, alibi_slopes):
    """Self-Extend-style merge of two kernel passes (near and far mask_fns) by their logsumexp,
    through a kernel's `*_fwd` (out, lse) and `*_bwd` (given the merged out and lse); returns
    (out, dq, dk, dv) for comparison with one reference pass over near | far."""
    from lcm.kernels.block_sparse.layout import layout_from_kinds
    from lcm.kernels.block_sparse.reference import dense_mask
    T, S = q.shape[1], k.shape[1]

    def options(fn):
        kinds = block_kinds(dense_mask(fn, T, S), block_q, block_k)
        kv_blocks, counts = layout_from_kinds(kinds)
        return dict(kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=fn, scale=0.2,
                    block_q=block_q, block_k=block_k, interpret=True, alibi_slopes=alibi_slopes)

    passes = (options(near), options(far))  # layouts in NumPy, outside jit

    @jax.jit
    def merged(q, k, v, d_out):
        (o1, l1), (o2, l2) = (fwd(q, k, v, **o) for o in passes)
        # Rows a pass does not reach have lse = +inf (so its backward gives 0): -inf to merge.
        l1, l2 = (jnp.where(jnp.isposinf(x), -jnp.inf, x) for x in (l1, l2))
        lse = jnp.logaddexp(l1, l2)
        out = jnp.exp(l1 - lse)[..., None] * o1 + jnp.exp(l2 - lse)[..., None] * o2
        g1, g2 = (bwd(q, k, v, out, lse, d_out, **o) for o in passes)
        return (out, *(a + b for a, b in zip(g1, g2)))

    return merged(q, k, v, d_out)


def cache_entries(cache, layer, row):
    """One (layer, row) of an `lcm.cache.KVCache` in any layout, per head: a list of
    {original position: (key, value)} dicts."""
    entries = cache.layer(layer)
    length = np.asarray(entries["length"][row])
    pos, k, v = (np.asarray(entries[n][row]) for n in ("pos", "k", "v"))
    if "head" in entries:  # pooled: the row's first sum(length) slots, each with its head
        head = np.asarray(entries["head"][row])[:length.sum()]
        return [{int(p): (k[i], v[i]) for i, p in enumerate(pos[:length.sum()]) if head[i] == h}
                for h in range(len(length))]
    return [{int(p): (k[h, i], v[h, i]) for i, p in enumerate(pos[h, :length[h]])}
            for h in range(len(length))]
