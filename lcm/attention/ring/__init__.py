"""Context parallelism: ring and all-gather attention over a mesh axis, their load-balancing
orders, and the fused Pallas ring kernels (`attend(..., impl="ring" | "allgather" |
"ring_pallas")` reaches each strategy)."""

from lcm.attention.ring.attention import (STRATEGIES, context_axis_size, ring_attention,
                                          ring_order_for)
from lcm.attention.ring.order import LOAD_BALANCE, RingOrder, make_ring_order

__all__ = ["ring_attention", "STRATEGIES", "RingOrder", "make_ring_order", "ring_order_for",
           "context_axis_size", "LOAD_BALANCE"]
