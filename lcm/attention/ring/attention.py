"""Ring attention: context parallelism over one mesh axis, K/V passed around a ring.

Each of the P devices of `axis_name` keeps its query shard; K/V shards travel device d -> d + 1
with `ppermute`. At ring step s device d holds the keys of device (d - s) mod P and runs the
`xla` backend's blockwise computation (`lcm.attention.blocked.blocked_forward_step`) over the
slice of the global block layout for (d, s). q, k, v are blocked once per call (q by a reshape,
K/V into the block matmuls' layout), K/V travel blocked, and the float32 online-softmax
statistics are carried across steps and updated in place: no step re-lays out its inputs or
allocates a partial output to merge. The next shard's transfer
is issued before the current block's compute so the two can overlap. A fully masked block pair
visits no block (no compute), and steps no device needs (e.g. Local(w) with w shorter than a
shard) are not run, nor their transfers.

Backward is a custom VJP: residuals are the local q, k, v, output and logsumexp only; K/V go
around the ring again (blocked) together with float32 dK/dV accumulators, which end on their
home device; dQ accumulates in place.
GQA sends only the K KV heads.

Sink logits (`sinks`, one per query head) enter each device's statistics once, when they are
initialised for its query shard, before any ring step: every row counts its sink exactly once
however many shards its keys span. Their gradient is summed over each device's rows here and
over devices by shard_map's transpose (sinks are replicated over the context axis).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from lcm.attention.blocked import (blocked_backward_step, blocked_delta, blocked_finish,
                                   blocked_forward_step, blocked_init, from_blocks, to_blocks)
from lcm.attention.blockwise import blockwise_attention
from lcm.attention.masks import Mask
from lcm.attention.ring.kernel import check_kernel_order, kernel_mask_fn, pallas_ring_local
from lcm.attention.ring.layout import (RingPlan, gathered_layout, global_kinds, make_plan,
                                       placed_mask, static_kinds, step_layout)
from lcm.attention.ring.order import LOAD_BALANCE, RingOrder, make_ring_order
from lcm.attention.ring.specs import check_and_prepare, check_rules, shard_specs
from lcm.kernels.block_sparse.common import sink_grad
from lcm.sharding.rules import DEFAULT_RULES, auto_mesh, explicit_axes

f32 = jnp.float32
STRATEGIES = ("ring", "allgather", "pallas")


def ring_attention(q, k, v, mask: Mask | None = None, *, mesh=None, axis_name: str = "context",
                   load_balance: str | RingOrder = "zigzag", scale: float | None = None,
                   softcap: float | None = None, block_q: int = 512, block_k: int = 512,
                   strategy: str = "ring", rules=DEFAULT_RULES, sinks=None):
    """Self-attention with the sequence split over mesh axis `axis_name`.

    q [B, L, H, D]; k, v [B, L, K, D] (H a multiple of K); `mask` as for `lcm.attention.attend`
    (every kind; per-token arrays such as Document's segment ids in the original order).
    `mesh`: a Mesh (default: the mesh set by `jax.set_mesh`). Batch and heads are also split over
    the mesh axes `rules` gives the logical axes "batch" and "kv_heads" when they divide
    (`lcm.sharding.logical_to_spec`; default lcm.sharding.DEFAULT_RULES: data/fsdp and tensor);
    the sequence goes over `axis_name` whatever rules["seq"] says.

    load_balance: "none", "zigzag", "striped" or "mask_aware" (see lcm.attention.ring.order):
    q, k, v are in the original order; they are padded and permuted to that ring order here and
    the output permuted back (one reshuffle of q, k, v and the output). Or a `RingOrder` over
    this axis size: q, k, v are already in that ring order and padded (`order.to_ring`), as a
    model does once for its inputs; the output stays in ring order. Per-token mask arrays
    (Document's segment ids) stay in the original order either way: each device holds them
    whole, and the layout reads them there.
    strategy: "ring" (pass K/V around), "allgather" (gather K/V, then compute locally) or
    "pallas" (forward and backward as fused Pallas TPU kernels moving K/V, and dK/dV, by remote
    DMA; index masks, "none"/"zigzag" orders, no softcap; interpreted off TPU; see
    lcm.attention.ring.kernel). `attend` reaches them as impl "ring", "allgather" and
    "ring_pallas".
    sinks: None or [H] float sink logits (as `lcm.attention.attend`; may be traced,
    differentiated), split over heads like q and counted once per row.
    Returns [B, L, H, D] in q's dtype; rows that see no key are zeros.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; expected one of {list(STRATEGIES)}")
    check_rules(rules)
    # Explicit mesh axes (jax.make_mesh's default): under jax.set_mesh, or with inputs sharded
    # over them, the ring runs with those axes as Auto; the output's type keeps q's sharding.
    typed = [jax.typeof(x).sharding.mesh for x in (q, k, v)]
    if mesh is None and explicit_axes(jax.sharding.get_abstract_mesh()):
        axes = explicit_axes(jax.sharding.get_abstract_mesh())
        out_sharding = jax.typeof(q).sharding.spec
    elif isinstance(mesh, jax.sharding.Mesh) and any(explicit_axes(m) for m in typed):
        axes = explicit_axes(mesh)
        out_sharding = jax.sharding.NamedSharding(mesh, jax.typeof(q).sharding.spec)
    else:
        axes = ()
    if axes:
        run = functools.partial(ring_attention, mask=mask, mesh=mesh, axis_name=axis_name,
                                load_balance=load_balance, scale=scale, softcap=softcap,
                                block_q=block_q, block_k=block_k, strategy=strategy,
                                rules=rules)
        return jax.sharding.auto_axes(lambda q, k, v, sinks: run(q, k, v, sinks=sinks),
                                      axes=axes, out_sharding=out_sharding)(q, k, v, sinks)
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    mesh = auto_mesh(mesh)  # a jax.make_mesh mesh: shard_map and constraints on its Auto twin
    P = context_axis_size(mesh, axis_name)
    B, L, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if isinstance(load_balance, RingOrder):
        order = load_balance
        if order.num_devices != P:
            raise ValueError(f"load_balance is a RingOrder over {order.num_devices} devices; mesh "
                             f"axis {axis_name!r} has {P}")
        if L != order.padded_length or k.shape[1] != L:
            raise ValueError(f"sequence length {L} (kv {k.shape[1]}) over mesh axis "
                             f"{axis_name!r}: a RingOrder input must have the order's padded "
                             f"length {order.padded_length} (use order.to_ring)")
        in_order = True
    elif load_balance in LOAD_BALANCE:
        in_order = False
        order = None
    else:
        raise ValueError(f"load_balance={load_balance!r}; expected one of {list(LOAD_BALANCE)} "
                         f"or a RingOrder")
    mask, scale, softcap, length = check_and_prepare(q, k, v, mask, scale, softcap, block_q,
                                                     block_k, order, sinks)
    block_q, block_k = int(block_q), int(block_k)  # NumPy ints pass the check
    if sinks is not None:
        sinks = jnp.asarray(sinks).astype(f32)
    if order is None:
        if load_balance == "mask_aware" and not _concrete(mask):
            raise ValueError("load_balance='mask_aware' needs a mask with concrete arrays; inside "
                             "jit build the order outside with make_ring_order(mask=...) and "
                             "pass it as load_balance")
        order = ring_order_for(length, P, load_balance, block_q=block_q, block_k=block_k,
                               mask=mask)
    if strategy == "pallas":
        if softcap is not None:
            raise ValueError("softcap with strategy='pallas' (impl='ring_pallas'): not in the "
                             "kernel; use strategy='ring' (impl='ring')")
        check_kernel_order(order, axis_name)
        mask_fn = kernel_mask_fn(mask)
    qspec, kspec, mask_spec = shard_specs(mesh, axis_name, q, k, mask, order, rules)
    # Contiguous shards without padding are already in ring order: nothing to permute.
    permute = not in_order and (order.load_balance != "none" or order.padded_length != L)
    if permute:
        # One reshuffle in, one out; keep the results sharded like the inputs (not replicated).
        q, k, v = (_constrain(order.to_ring(x), mesh, qspec) for x in (q, k, v))
    bq, bk = min(block_q, order.chunk_size), min(block_k, order.chunk_size)
    if order.chunk_size % bq or order.chunk_size % bk:
        raise ValueError(f"block_q={bq} and block_k={bk} must divide the ring order's "
                         f"chunk_size={order.chunk_size} (mesh axis {axis_name!r})")
    plan = make_plan(mask, order, bq, bk)
    # A static mask's global layout is NumPy, made here; an array mask's is made on each device.
    static = None if mask is not None and not mask.is_static else _Const(static_kinds(mask, plan))
    st = _Static(plan, axis_name, float(scale), softcap, static)
    if strategy == "allgather":
        body = functools.partial(_allgather_local, st)
    elif strategy == "pallas":
        body = functools.partial(pallas_ring_local, st, mask_fn)
    else:
        body = functools.partial(_ring_local, st)
    args, in_specs = (q, k, v, mask), (qspec, kspec, kspec, mask_spec)
    if sinks is None:
        local = functools.partial(_without_sinks, body)
    else:  # sinks [H] split over heads like q (whose heads split like K's)
        local = body
        args, in_specs = args + (sinks,), in_specs + (PartitionSpec(qspec[2]),)
    out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qspec,
                        check_vma=False)(*args)
    return _constrain(order.from_ring(out), mesh, qspec) if permute else out


def ring_order_for(length: int, num_devices: int, load_balance: str = "zigzag", *,
                   block_q: int = 512, block_k: int = 512, mask: Mask | None = None) -> RingOrder:
    """The RingOrder `ring_attention` builds for `length` tokens: blocks clipped to a chunk,
    chunks a multiple of both blocks. A model applies it once to its inputs (`to_ring`) and
    passes it as `load_balance`, so its layers attend in ring order without reshuffling."""
    chunks = num_devices if load_balance == "none" else 2 * num_devices
    raw = _round_up(-(-length // chunks), 8)
    bq, bk = min(block_q, raw), min(block_k, raw)
    if math.lcm(bq, bk) > raw:
        bq = bk = min(bq, bk)
    return make_ring_order(length, num_devices, load_balance, block=math.lcm(bq, bk), mask=mask)


def context_axis_size(mesh=None, axis_name: str = "context") -> int:
    """Size of the context-parallel axis of `mesh` (default: the mesh of `jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if axis_name not in getattr(mesh, "axis_names", ()):
        raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh (axes "
                         f"{tuple(getattr(mesh, 'axis_names', ()))}); pass mesh= or set one with "
                         f"jax.set_mesh, with a context-parallel axis")
    return mesh.shape[axis_name]


def _without_sinks(body, q, k, v, mask):
    return body(q, k, v, mask, None)


def _constrain(x, mesh, spec):
    """x placed as `spec` on `mesh`. Eagerly, a length the mesh does not divide (the output
    back in the original order, e.g. 13 tokens over 8 devices) is left as it is: there the
    constraint raises IndivisibleError, while under jit it pads (and is kept)."""
    if not isinstance(x, jax.core.Tracer):
        sizes = dict(mesh.shape)
        for dim, axes in zip(x.shape, spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            if dim % math.prod(sizes[a] for a in axes):
                return x
    if isinstance(mesh, jax.sharding.Mesh):
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, spec)  # under jax.set_mesh


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _concrete(mask):
    return all(not isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(mask))


class _Const:
    """A NumPy array as part of a hashable static argument (compared by identity)."""

    def __init__(self, value):
        self.value = value


@dataclasses.dataclass(frozen=True)
class _Static:
    plan: RingPlan
    axis_name: str
    scale: float
    softcap: float | None
    static_kinds: _Const | None

    @property
    def num_devices(self):
        return self.plan.order.num_devices

    def kinds(self, mask):
        """The global block kinds [nq, nk] (original order, padded)."""
        if self.static_kinds is not None:
            return self.static_kinds.value
        return global_kinds(mask, self.plan, jnp)


def _shift(x, axis_name, P, hops=1):
    """x sent from device i to device i + hops (mod P) along axis_name."""
    if hops % P == 0:
        return x
    return lax.ppermute(x, axis_name, [(i, (i + hops) % P) for i in range(P)])


def _blocks(st, q, k, v):
    """The blocked q (a reshape) and K/V (one copy each) the local steps consume."""
    K = k.shape[2]
    return (to_blocks(q, st.plan.block_q, K), to_blocks(k, st.plan.block_k),
            to_blocks(v, st.plan.block_k))


def _step_layout(st, mask, kinds_g, device, step):
    source = (device - step) % st.num_devices
    return (step_layout(kinds_g, st.plan, device, source),
            placed_mask(mask, st.plan, device, source))


def _local_sinks(sinks, num_kv_heads):
    """This device's sinks [H] as [K, G] (the layout of the blocked statistics), or None."""
    return None if sinks is None else sinks.reshape(num_kv_heads, -1)


def _forward(st, q, k, v, mask, sinks):
    """Local output [B, T, H, D] and lse [B, nq, bq, K, G] float32 (+inf: nothing seen; with
    sinks, they are counted in: statistics start from them, once per row).

    q stays blocked and K/V travel blocked; the float32 statistics are carried through every
    step and updated in place, so no step allocates a partial output to merge.
    """
    P, n = st.num_devices, st.plan.num_steps
    device = lax.axis_index(st.axis_name)
    kinds_g = st.kinds(mask)
    qb, kb, vb = _blocks(st, q, k, v)

    def step_fn(step, kb, vb, stats):
        layout, local_mask = _step_layout(st, mask, kinds_g, device, step)
        return blocked_forward_step(qb, kb, vb, local_mask, layout, stats, scale=st.scale,
                                    softcap=st.softcap)

    def body(step, carry):
        kb, vb, stats = carry
        # Issue the next shard's transfer first: it does not wait for this step's compute.
        k_next, v_next = _shift((kb, vb), st.axis_name, P)
        return k_next, v_next, step_fn(step, kb, vb, stats)

    init = blocked_init(qb, _local_sinks(sinks, k.shape[2]))
    kb, vb, stats = lax.fori_loop(0, n - 1, body, (kb, vb, init))
    out, lse = blocked_finish(step_fn(n - 1, kb, vb, stats), q.dtype)
    return from_blocks(out), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_local(st, q, k, v, mask, sinks):
    return _forward(st, q, k, v, mask, sinks)[0]


def _ring_local_fwd(st, q, k, v, mask, sinks):
    out, lse = _forward(st, q, k, v, mask, sinks)
    return out, (q, k, v, mask, sinks, out, lse)


def _ring_local_bwd(st, residuals, d_out):
    """residuals: q, k, v, mask, sinks, out and lse [B, nq, bq, K, G] float32 (+inf: nothing
    seen)."""
    q, k, v, mask, sinks, out, lse = residuals
    P, n = st.num_devices, st.plan.num_steps
    device = lax.axis_index(st.axis_name)
    kinds_g = st.kinds(mask)
    qb, kb, vb = _blocks(st, q, k, v)
    dob = to_blocks(d_out, st.plan.block_q, k.shape[2])
    delta = blocked_delta(to_blocks(out, st.plan.block_q, k.shape[2]), dob)

    def grads(step, kb, vb, acc):
        layout, local_mask = _step_layout(st, mask, kinds_g, device, step)
        return blocked_backward_step(qb, kb, vb, dob, lse, delta, local_mask, layout, acc,
                                     scale=st.scale, softcap=st.softcap)

    def body(step, carry):
        kb, vb, dq, dk_acc, dv_acc = carry
        k_next, v_next = _shift((kb, vb), st.axis_name, P)
        dq, dk_acc, dv_acc = grads(step, kb, vb, (dq, dk_acc, dv_acc))
        # dK/dV of the shard held now travel on with it, one hop behind its K/V.
        dk_acc, dv_acc = _shift((dk_acc, dv_acc), st.axis_name, P)
        return k_next, v_next, dq, dk_acc, dv_acc

    zeros = functools.partial(jnp.zeros, dtype=f32)
    init = (kb, vb, zeros(qb.shape), zeros(kb.shape), zeros(vb.shape))
    kb, vb, dq, dk_acc, dv_acc = lax.fori_loop(0, n - 1, body, init)
    dq, dk_acc, dv_acc = grads(n - 1, kb, vb, (dq, dk_acc, dv_acc))
    # The accumulators now sit n - 1 hops from home: one direct transfer brings them back.
    dk, dv = _shift((dk_acc, dv_acc), st.axis_name, P, hops=1 - n)
    # This device's rows' share; shard_map's transpose sums the shares over the context axis.
    d_sinks = None if sinks is None else sink_grad(
        _local_sinks(sinks, k.shape[2]), lse, delta, axis=(0, 1, 2)).reshape(-1)
    return (from_blocks(dq).astype(q.dtype), from_blocks(dk).astype(k.dtype),
            from_blocks(dv).astype(v.dtype), None, d_sinks)


_ring_local.defvjp(_ring_local_fwd, _ring_local_bwd)


def _allgather_local(st, q, k, v, mask, sinks):
    """All-gather context parallelism: each device gathers K/V (ring order) and attends once.

    Differentiated by JAX: the gathers' transpose reduce-scatters dK/dV.
    """
    device = lax.axis_index(st.axis_name)
    k_all = lax.all_gather(k, st.axis_name, axis=1, tiled=True)
    v_all = lax.all_gather(v, st.axis_name, axis=1, tiled=True)
    layout, local_mask = gathered_layout(st.kinds(mask), mask, st.plan, device)
    return blockwise_attention(q, k_all, v_all, local_mask, layout, scale=st.scale,
                               softcap=st.softcap, sinks=sinks)
