"""ALiBi as an attention option: per-query-head slopes, a linear bias in the query-key distance.

Every backend adds `-slope_h * (query position - key position)` to the (soft-capped) logits,
queries aligned to the end of the keys (query row i sits at key position i + kv_len - q_len), so
the bias costs no [T, S] array: kernels build it per block from indices. Slopes are constants of
a model (Press et al. fix them per head count), so they are taken as concrete values and kept as
static floats; gradients never flow into them. The helpers live beside the kernels, which take
the same option.
"""

from lcm.kernels.block_sparse.common import alibi_bias, check_alibi_slopes

__all__ = ["alibi_bias", "check_alibi_slopes"]
