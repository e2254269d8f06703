"""Ring attention as fused Pallas TPU kernels (K/V and dK/dV moved by remote DMA), beside the
forward's JAX twin."""

from .reference import ring_attention_reference
from .tpu import ORDERS, ring_attention_tpu, shard_positions
from .tpu_bwd import ring_attention_tpu_bwd

__all__ = ["ring_attention_tpu", "ring_attention_tpu_bwd", "ring_attention_reference",
           "shard_positions", "ORDERS"]
