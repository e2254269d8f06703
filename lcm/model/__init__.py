"""The functional decoder: params as pytrees, pure forward."""

from lcm.model.decoder import embed, forward, segment_positions, unembed
from lcm.model.layers import (attention_block, project_out, project_qkv, rms_norm,
                              swiglu_mlp)
from lcm.model.params import WeightSpec, init_params, param_axes, param_shapes, param_specs

__all__ = ["forward", "embed", "unembed", "segment_positions", "init_params", "param_axes",
           "param_shapes", "param_specs", "WeightSpec", "attention_block", "project_qkv",
           "project_out", "rms_norm", "swiglu_mlp"]
