"""Positions: rotary embeddings and their scaling family; Self-Extend, ReRoPE, ALiBi, NoPE."""

from lcm.config import PositionConfig, RopeConfig
from lcm.positions.extension import (FarCausal, alibi_slopes, merged_attention,
                                     position_attention, self_extend_positions)
from lcm.positions.rope import apply_rope, rope_frequencies

__all__ = ["RopeConfig", "apply_rope", "rope_frequencies", "PositionConfig", "FarCausal",
           "alibi_slopes", "merged_attention", "position_attention", "self_extend_positions"]
