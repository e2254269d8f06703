"""Positions: rotary embeddings (and, later, their scaling family, ALiBi, Self-Extend maps)."""

from lcm.config import RopeConfig
from lcm.positions.rope import apply_rope, rope_frequencies

__all__ = ["RopeConfig", "apply_rope", "rope_frequencies"]
