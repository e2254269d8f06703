"""Helpers shared by test files (tests/ is on sys.path via pyproject's pytest `pythonpath`)."""

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse.layout import FULL, PARTIAL, SKIP


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
