"""Segment recurrence: a decoder runs a long sequence segment by segment, carrying a memory."""

from lcm.memory.base import Memory, NoMemory
from lcm.memory.decoder import (init_memory_params, init_memory_state, memory_param_specs,
                                run_segments)
from lcm.memory.scan import segment_scan
from lcm.memory.xl import TransformerXL

__all__ = ["segment_scan", "run_segments", "init_memory_params", "init_memory_state",
           "memory_param_specs", "Memory", "NoMemory", "TransformerXL"]
