"""Block-sparse flash attention kernels (Pallas): TPU (Mosaic), GPU (Triton), interpret on CPU.

All kernels take the same block layout (layout.py) and in-kernel mask protocol (reference.py).
"""

from kernels.block_sparse.gpu import (block_sparse_attention_gpu, block_sparse_attention_gpu_bwd,
                                      block_sparse_attention_gpu_fwd)
from kernels.block_sparse.layout import FULL, PARTIAL, SKIP, layout_from_kinds, transpose_layout
from kernels.block_sparse.reference import attention_reference, dense_mask
from kernels.block_sparse.tpu import (block_sparse_attention_tpu, block_sparse_attention_tpu_bwd,
                                      block_sparse_attention_tpu_fwd)

__all__ = ["block_sparse_attention_tpu", "block_sparse_attention_gpu", "attention_reference",
           "block_sparse_attention_tpu_fwd", "block_sparse_attention_tpu_bwd",
           "block_sparse_attention_gpu_fwd", "block_sparse_attention_gpu_bwd",
           "dense_mask", "layout_from_kinds", "transpose_layout", "SKIP", "PARTIAL", "FULL"]
