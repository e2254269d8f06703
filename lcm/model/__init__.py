"""The functional decoder: params as pytrees, pure forward, one decoder layer for every path."""

from lcm.model.checks import check_finite_params, check_params, check_token_ids, checked
from lcm.model.decoder import embed, forward, segment_positions, unembed
from lcm.model.layers import (LayerInputs, decoder_layer, identity, rms_norm, rope_tables,
                              run_layers, scan_layers, schedule, self_attention)
from lcm.model.params import WeightSpec, init_params, param_axes, param_shapes, param_specs

__all__ = ["forward", "embed", "unembed", "segment_positions", "init_params", "param_axes",
           "param_shapes", "param_specs", "WeightSpec", "LayerInputs", "decoder_layer",
           "run_layers", "scan_layers", "schedule", "rope_tables", "self_attention", "rms_norm",
           "identity", "check_params", "check_token_ids", "checked",
           "check_finite_params"]
