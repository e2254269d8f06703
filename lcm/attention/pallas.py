"""The `pallas` backend: block-sparse flash-attention kernels driven by the shared block layout.

On a TPU the Mosaic kernel runs compiled; on a GPU the Triton kernel; on a CPU the TPU kernel
runs in Pallas' interpret mode (slow: for tests and small checks). The layout is per KV head, so
the query heads of a group share one K/V block fetch and skip only what all of them skip.
"""

from __future__ import annotations

import jax

from lcm.attention.kernel_masks import kernel_mask
from lcm.attention.layout import mask_layout

PLATFORMS = ("tpu", "gpu", "interpret")


def default_platform() -> str:
    backend = jax.default_backend()
    return backend if backend in ("tpu", "gpu") else "interpret"


def pallas_attention(q, k, v, mask, *, scale, softcap, block_q, block_k, platform=None):
    """q [B, T, H, D]; k, v [B, S, K, D] -> [B, T, H, D] through kernels/block_sparse."""
    platform = default_platform() if platform is None else platform
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r}; expected one of {list(PLATFORMS)}")
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    mask_fn, q_seg, kv_seg = kernel_mask(mask, offset=S - T, block_q=block_q, block_k=block_k,
                                         grouped=H != K)
    layout = mask_layout(mask, T, S, block_q, block_k, num_heads=H, num_kv_heads=K)
    common = dict(kinds=layout.kinds, kv_blocks=layout.kv_blocks, counts=layout.counts,
                  mask_fn=mask_fn, q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=scale,
                  softcap=softcap, block_q=block_q, block_k=block_k)
    if platform == "gpu":
        from kernels.block_sparse.gpu import block_sparse_attention_gpu
        return block_sparse_attention_gpu(q, k, v, **common)
    from kernels.block_sparse.tpu import block_sparse_attention_tpu
    return block_sparse_attention_tpu(q, k, v, interpret=platform == "interpret", **common)
