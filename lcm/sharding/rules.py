"""Logical axis names -> mesh axes: one rule table, passed in, for params and activations."""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Logical axis -> mesh axis, a tuple of mesh axes, or None (replicated).
DEFAULT_RULES = {
    "batch": ("data", "fsdp"),
    "seq": "context",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
}


def logical_to_spec(axes, shape, mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dims are named `axes`.

    A mesh axis is used at most once per array (the first dim that asks gets it: activations
    [batch, seq, embed] shard batch over data and fsdp, and leave embed whole). Mesh axes that
    are absent from the mesh, of size 1, or do not divide the dim are left out, so the dim is
    replicated over them: e.g. SmolLM2's 3 KV heads stay whole on a tensor axis of 2.
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    used, spec = set(), []
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        wanted = rules.get(name) if name is not None else None
        wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
        kept = []
        for mesh_axis in wanted:
            n = mesh.shape.get(mesh_axis, 1)
            if mesh_axis in used or n == 1 or size % (math.prod(mesh.shape[a] for a in kept) * n):
                continue
            kept.append(mesh_axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def _is_axes(x):
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def auto_mesh(mesh):
    """`mesh` with every axis Auto: the same devices and axis names. jax.make_mesh gives
    Explicit axes by default, on which `with_sharding_constraint` and lcm's sharding by logical
    axes do not apply; lcm places and constrains on this twin instead (XLA propagates)."""
    if not isinstance(mesh, jax.sharding.Mesh) or all(
            t == jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def explicit_axes(mesh) -> tuple[str, ...]:
    """The names of `mesh`'s Explicit axes (a Mesh or AbstractMesh; () for None)."""
    if mesh is None:
        return ()
    return tuple(name for name, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ()))
                 if t == jax.sharding.AxisType.Explicit)


def param_shardings(params, axes, mesh, rules=DEFAULT_RULES):
    """NamedShardings for a params tree from its parallel logical-axes tree (on
    `auto_mesh(mesh)`)."""
    mesh = auto_mesh(mesh)
    return jax.tree.map(
        lambda ax, p: NamedSharding(mesh, logical_to_spec(ax, p.shape, mesh, rules)),
        axes, params, is_leaf=_is_axes)


def shard_params(params, axes, mesh, rules=DEFAULT_RULES):
    """Places every leaf of `params` on `mesh` by its logical axes."""
    return jax.device_put(params, param_shardings(params, axes, mesh, rules))


@dataclasses.dataclass(frozen=True)
class LogicalSharding:
    """Constrains activations by logical axis names: `LogicalSharding(mesh, rules)(x, axes)`.

    Pass it as `forward(..., shard=LogicalSharding(mesh))` inside `jit`.
    """

    mesh: jax.sharding.Mesh
    rules: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

    def __post_init__(self):
        object.__setattr__(self, "mesh", auto_mesh(self.mesh))  # jax.make_mesh's Explicit axes

    def spec(self, x, axes) -> PartitionSpec:
        return logical_to_spec(axes, x.shape, self.mesh, self.rules)

    def __call__(self, x, axes):
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(x, axes)))

    def __hash__(self):
        return hash((self.mesh, tuple(sorted((k, str(v)) for k, v in self.rules.items()))))
