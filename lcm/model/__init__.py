"""The functional decoder: params as pytrees, pure forward."""

from lcm.model.decoder import forward, segment_positions
from lcm.model.layers import attention_block, rms_norm, swiglu_mlp
from lcm.model.params import WeightSpec, init_params, param_axes, param_shapes, param_specs

__all__ = ["forward", "segment_positions", "init_params", "param_axes", "param_shapes",
           "param_specs", "WeightSpec", "attention_block", "rms_norm", "swiglu_mlp"]
