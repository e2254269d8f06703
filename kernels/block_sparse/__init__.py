"""Block-sparse flash attention kernels (Pallas): TPU (Mosaic), GPU (Triton), interpret on CPU.

All kernels take the same compressed block layout (layout.py: per query block, the key blocks to
visit and each visit's kind) and in-kernel mask protocol (reference.py), including head-aware
masks that read per-head tables (scalar prefetch on TPU).
"""

from .gpu import (block_sparse_attention_gpu, block_sparse_attention_gpu_bwd,
                  block_sparse_attention_gpu_fwd)
from .layout import (FULL, PARTIAL, SKIP, layout_from_kinds, max_q_visits_of, transpose_layout,
                     transpose_visits)
from .reference import attention_reference, dense_mask
from .tpu import (block_sparse_attention_tpu, block_sparse_attention_tpu_bwd,
                  block_sparse_attention_tpu_fwd)

__all__ = ["block_sparse_attention_tpu", "block_sparse_attention_gpu", "attention_reference",
           "block_sparse_attention_tpu_fwd", "block_sparse_attention_tpu_bwd",
           "block_sparse_attention_gpu_fwd", "block_sparse_attention_gpu_bwd",
           "dense_mask", "layout_from_kinds", "transpose_layout", "transpose_visits",
           "max_q_visits_of", "SKIP", "PARTIAL", "FULL"]
