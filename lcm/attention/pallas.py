"""The `pallas` backend: block-sparse flash-attention kernels driven by the shared block layout.

On a TPU the Mosaic kernel runs compiled; on a GPU the Triton kernel; on a CPU the TPU kernel
runs in Pallas' interpret mode (slow: for tests and small checks). The layout is per KV head, so
the query heads of a group share one K/V block fetch and skip only what all of them skip; masks
with per-head data (VerticalSlash, per-head BlockMask) are then applied per query head in-kernel
from index tables (kernel_masks.py). The kernels take the compressed layout (per-visit kinds).
"""

from __future__ import annotations

import jax

from lcm.attention.kernel_masks import kernel_mask
from lcm.attention.layout import mask_layout

PLATFORMS = ("tpu", "gpu", "interpret")


def default_platform() -> str:
    backend = jax.default_backend()
    return backend if backend in ("tpu", "gpu") else "interpret"


def pallas_attention(q, k, v, mask, *, scale, softcap, block_q, block_k, platform=None,
                     alibi_slopes=None, sinks=None):
    """q [B, T, H, D]; k, v [B, S, K, D] -> [B, T, H, D] through kernels/block_sparse; sinks:
    None or [H] float sink logits (see lcm.attention.attend), differentiated."""
    platform, kwargs = _kernel_kwargs(q, k, mask, scale, softcap, block_q, block_k, platform,
                                      alibi_slopes)
    kwargs["sinks"] = sinks
    if platform == "gpu":
        from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu
        return block_sparse_attention_gpu(q, k, v, **kwargs)
    from lcm.kernels.block_sparse.tpu import block_sparse_attention_tpu
    return block_sparse_attention_tpu(q, k, v, interpret=platform == "interpret", **kwargs)


def pallas_attention_with_lse(q, k, v, mask, *, scale, softcap=None, block_q, block_k,
                              platform=None, alibi_slopes=None):
    """Forward only, for merged passes: (out [B, T, H, D], lse [B, T, H, 1] float32, +inf on
    rows that see no key), as `lcm.attention.blockwise.attention_with_lse` but from the kernels.
    `mask` is prepared (`mask.prepare(T, S)`); differentiate with `pallas_attention_backward`."""
    platform, kwargs = _kernel_kwargs(q, k, mask, scale, softcap, block_q, block_k, platform,
                                      alibi_slopes)
    if platform == "gpu":
        from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu_fwd
        out, lse = block_sparse_attention_gpu_fwd(q, k, v, **kwargs)
    else:
        from lcm.kernels.block_sparse.tpu import block_sparse_attention_tpu_fwd
        out, lse = block_sparse_attention_tpu_fwd(q, k, v, interpret=platform == "interpret",
                                                  **kwargs)
    return out, lse[..., None]


def pallas_attention_backward(q, k, v, mask, out, lse, d_out, *, scale, softcap=None, block_q,
                              block_k, platform=None, alibi_slopes=None):
    """(dq, dk, dv) of a pass whose softmax normaliser is lse [B, T, H, 1] and whose (possibly
    merged) output is `out`, as `lcm.attention.blockwise.attention_backward`."""
    platform, kwargs = _kernel_kwargs(q, k, mask, scale, softcap, block_q, block_k, platform,
                                      alibi_slopes)
    if platform == "gpu":
        from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu_bwd
        return block_sparse_attention_gpu_bwd(q, k, v, out, lse[..., 0], d_out, **kwargs)
    from lcm.kernels.block_sparse.tpu import block_sparse_attention_tpu_bwd
    return block_sparse_attention_tpu_bwd(q, k, v, out, lse[..., 0], d_out,
                                          interpret=platform == "interpret", **kwargs)


def _kernel_kwargs(q, k, mask, scale, softcap, block_q, block_k, platform, alibi_slopes):
    """(platform, the kernels' keyword arguments): the layout and in-kernel mask of `mask`."""
    platform = default_platform() if platform is None else platform
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r}; expected one of {list(PLATFORMS)}")
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    mask_fn, q_seg, kv_seg, tables = kernel_mask(mask, offset=S - T, block_q=block_q,
                                                 block_k=block_k, grouped=H != K, batch=B,
                                                 q_len=T, kv_len=S)
    layout = mask_layout(mask, T, S, block_q, block_k, num_heads=H, num_kv_heads=K)
    # The kernels take the compressed layout (per-visit kinds); the TPU kernel derives its exact
    # dK/dV grid bound from a static layout's visit lists on the host.
    return platform, dict(visit_kinds=layout.visit_kinds, kv_blocks=layout.kv_blocks,
                          counts=layout.counts,
                          mask_fn=mask_fn, mask_tables=tables, q_segment_ids=q_seg,
                          kv_segment_ids=kv_seg, scale=scale, softcap=softcap,
                          block_q=block_q, block_k=block_k,
                          alibi_slopes=alibi_slopes)
