"""Meshes (real or simulated CPU devices) and logical-axis sharding rules."""

from lcm.sharding.mesh import MESH_AXES, make_mesh, simulate_cpu_devices
from lcm.sharding.rules import (DEFAULT_RULES, LogicalSharding, auto_mesh, explicit_axes,
                                logical_to_spec, param_shardings, shard_params)

__all__ = ["MESH_AXES", "make_mesh", "simulate_cpu_devices", "DEFAULT_RULES", "LogicalSharding",
           "auto_mesh", "explicit_axes", "logical_to_spec", "param_shardings", "shard_params"]
