"""Device meshes over real or simulated devices."""

from __future__ import annotations

import math
import os

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor", "context")


def simulate_cpu_devices(count: int) -> None:
    """Makes the CPU backend expose `count` devices, for mesh tests without accelerators.

    Must run before JAX initialises its backends (before the first array is created); raises
    ValueError if that has already happened with a different device count.
    """
    if not _is_int(count) or count <= 0:
        raise ValueError(f"count={count!r}; expected a positive int")
    count = int(count)
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        # Backends already initialised: fine if they already have the devices asked for.
        if len(jax.devices("cpu")) != count:
            raise ValueError(
                f"simulate_cpu_devices({count}) called after JAX started with "
                f"{len(jax.devices('cpu'))} CPU devices; call it before creating any array")


def make_mesh(shape, axis_names=MESH_AXES, *, devices=None) -> jax.sharding.Mesh:
    """A Mesh of `shape` (e.g. (2, 2, 2, 1)) named `axis_names` over `devices` (default: all).

    Axis sizes must multiply to the number of devices. Use `simulate_cpu_devices` first to test
    on a CPU. The usual names are data, fsdp, tensor and context (see lcm.sharding.DEFAULT_RULES).
    """
    shape, axis_names = tuple(shape), tuple(axis_names)
    if len(shape) != len(axis_names):
        raise ValueError(f"shape={shape} has {len(shape)} axes but axis_names={axis_names} has "
                         f"{len(axis_names)}")
    if any(not _is_int(s) or s <= 0 for s in shape):
        raise ValueError(f"shape={shape}; expected positive ints")
    shape = tuple(int(s) for s in shape)
    if len(set(axis_names)) != len(axis_names):
        raise ValueError(f"axis_names={axis_names} has duplicates")
    devices = jax.devices() if devices is None else list(devices)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have "
                         f"{len(devices)} (on CPU, call simulate_cpu_devices({math.prod(shape)}) "
                         f"before using JAX)")
    # Auto axes: XLA propagates shardings from the params and the constraints lcm places.
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    if devices == jax.devices():
        return jax.make_mesh(shape, axis_names, axis_types=auto, devices=devices)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), axis_names, axis_types=auto)


def host_array(x) -> np.ndarray:
    """Every element of a concrete array as numpy, also when its shards live on several
    processes (then it is a collective: every process must call it, in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _is_int(value) -> bool:
    """A Python or NumPy integer, not a bool (lcm.sharding imports nothing from lcm)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
