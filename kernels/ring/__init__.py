"""Ring attention as one Pallas TPU kernel (K/V moved by remote DMA), beside its JAX twin."""

from kernels.ring.reference import ring_attention_reference
from kernels.ring.tpu import ORDERS, ring_attention_tpu, shard_positions

__all__ = ["ring_attention_tpu", "ring_attention_reference", "shard_positions", "ORDERS"]
