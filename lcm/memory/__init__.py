"""Segment recurrence: a decoder runs a long sequence segment by segment, carrying a memory.

Memory kinds (values passed as `run_segments(..., memory=...)`): TransformerXL, RecurrentMemory,
CompressiveMemory (Infini-attention), KNNMemory (Memorizing Transformer; `layers=(i,)` for one
memory layer), RetrievedBlocks (InfLLM; `repr_tokens=r` for its representative tokens,
`boundaries="surprise"` for EM-LLM's events), LinearRecurrence (gated linear attention),
NoMemory.
"""

from lcm.memory.base import Memory, NoMemory
from lcm.memory.blocks import RetrievedBlocks
from lcm.memory.compressive import CompressiveMemory
from lcm.memory.decoder import (init_memory_params, init_memory_state, memory_param_specs,
                                run_segments)
from lcm.memory.knn import KNNMemory, knn_attention
from lcm.memory.linear import (LinearRecurrence, chunked_linear_attention,
                               linear_attention_step, quadratic_linear_attention)
from lcm.memory.rmt import RecurrentMemory
from lcm.memory.scan import segment_scan
from lcm.memory.xl import TransformerXL

__all__ = ["segment_scan", "run_segments", "init_memory_params", "init_memory_state",
           "memory_param_specs", "Memory", "NoMemory", "TransformerXL", "RecurrentMemory",
           "CompressiveMemory", "KNNMemory", "knn_attention", "LinearRecurrence",
           "chunked_linear_attention", "linear_attention_step", "quadratic_linear_attention",
           "RetrievedBlocks"]
