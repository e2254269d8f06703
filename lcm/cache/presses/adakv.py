"""AdaKV (Feng et al. 2024, kvpress's AdaKVPress): head-wise budgets within a layer."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lcm.cache.presses.base import INF, WrapperPress, compact, register
from lcm.cache.presses.snapkv import SnapKV
from lcm.checks import check_number


def n_safe(n_kept: int, alpha: float) -> int:
    """Entries every head keeps first: int(n_kept * alpha), at least 1 when alpha > 0."""
    count = int(n_kept * alpha)
    return max(1, count) if alpha > 0 and n_kept > 0 else 0


@register
@dataclasses.dataclass(frozen=True)
class AdaKV(WrapperPress):
    """The inner press's scores compete across the kv heads of a layer for heads * n_kept
    slots, each head first getting its top alpha_safeguard * n_kept.

    Unlike kvpress (which masks keys and keeps the full cache), heads really hold different
    numbers of entries: each layer's heads share one pool of heads * n_kept slots (+ room for
    decoding), so the memory is the budget (`lcm.cache.layouts`). `capacity_factor` caps what
    one head may win at capacity_factor * n_kept (the surplus goes to the next-best entries of
    other heads); with `layout="uniform"` every head is sized for the most one head can win,
    min(prompt, heads * n_kept - (heads - 1) * n_safe), or that cap.
    """

    alpha_safeguard: float = 0.20
    capacity_factor: float | None = None

    compresses_while_decoding = True

    def __post_init__(self):
        super().__post_init__()
        check_number("AdaKV", "alpha_safeguard", self.alpha_safeguard, 0.0, 1.0)
        if self.capacity_factor is not None:
            check_number("AdaKV", "capacity_factor", self.capacity_factor, 1.0, math.inf,
                         hi_open=True)

    def storage(self, layout: str) -> str:
        # With re-rotated keys (positions="cache") entries are ranked per head: kept uniform.
        if layout == "uniform" or self.positions != "original":
            return "uniform"
        return "pooled"

    def head_capacity(self, n_kept: int, num_heads: int) -> int:
        """The most entries one head can win when `num_heads` heads compete for num_heads *
        n_kept: all but the other heads' safeguards, or capacity_factor * n_kept."""
        most = num_heads * n_kept - (num_heads - 1) * n_safe(n_kept, self.alpha_safeguard)
        if self.capacity_factor is not None:
            most = min(most, int(np.ceil(self.capacity_factor * n_kept)))
        return most

    def decode_target(self, target, n, num_heads, slots):
        # The heads of a row compete for K * target slots, whatever each holds now.
        return jnp.full_like(n, target), min(self.head_capacity(target, num_heads), slots)

    def select(self, scores, n_keep, cap):
        """Each head's top n_safe, then the layer's K * n_kept best entries overall, at most
        `cap` per head (heads of a row share n_keep)."""
        n_kept = n_keep[:, 0]
        B, K, _ = scores.shape
        alpha = self.alpha_safeguard
        safe = jnp.where(alpha > 0, jnp.maximum(1, (n_kept * alpha).astype(jnp.int32)), 0)
        safe = jnp.where(n_kept > 0, safe, 0)
        vals, idx = jax.lax.top_k(scores, cap)  # per head candidates, best first
        rank = jnp.arange(cap, dtype=jnp.int32).reshape(1, 1, cap)
        boosted = jnp.where((rank < safe[:, None, None]) & (vals > -INF), INF, vals)
        flat = boosted.reshape(B, K * cap)
        order_rank = jnp.argsort(jnp.argsort(-flat, axis=-1, stable=True), axis=-1, stable=True)
        keep = (order_rank < (K * n_kept)[:, None]) & (flat > -INF)
        return compact(idx, keep.reshape(B, K, cap))

    @classmethod
    def example(cls):
        return cls(SnapKV(0.5, window_size=2, kernel_size=3))
