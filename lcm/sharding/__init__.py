"""Meshes (real or simulated CPU devices), logical-axis sharding rules, context parallelism."""

from lcm.sharding.mesh import MESH_AXES, make_mesh, simulate_cpu_devices
from lcm.sharding.ring import context_axis_size, ring_attention, ring_order_for
from lcm.sharding.ring_order import LOAD_BALANCE, RingOrder, make_ring_order
from lcm.sharding.rules import (DEFAULT_RULES, LogicalSharding, logical_to_spec,
                                param_shardings, shard_params)

__all__ = ["MESH_AXES", "make_mesh", "simulate_cpu_devices", "DEFAULT_RULES", "LogicalSharding",
           "logical_to_spec", "param_shardings", "shard_params", "ring_attention", "RingOrder",
           "ring_order_for", "context_axis_size",
           "make_ring_order", "LOAD_BALANCE"]
