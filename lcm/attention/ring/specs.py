"""Input checks and shard_map specs shared by the context-parallel strategies (ring, allgather)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax.sharding import PartitionSpec

from lcm.attention.checks import check_inputs
from lcm.attention.masks import Mask
from lcm.sharding.rules import DEFAULT_RULES, logical_to_spec


def check_and_prepare(q, k, v, mask, scale, softcap, block_q, block_k, order, sinks=None):
    """Validates like `attend` (plus q_len == kv_len); returns (mask, scale, softcap, length).

    With a RingOrder (q, k, v already in ring order), Document segment ids stay in the original
    order, [batch, order.length]: the layout and the element mask read them there, and every
    device holds them whole, so a model permutes only its activations (no gather per call).
    """
    if any(getattr(x, "ndim", None) != 4 for x in (q, k, v)):
        check_inputs(q, k, v, None, scale, softcap, block_q, block_k, sinks)  # raises
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q_len={q.shape[1]} != kv_len={k.shape[1]}: context-parallel "
                         f"attention is self-attention over one sharded sequence")
    length = q.shape[1] if order is None else order.length
    if order is not None and mask is not None:
        mask.check_original_order(order.length)
    # Validate at the true length; padding (if any) is the ring's business.
    def shape(x):
        return jax.ShapeDtypeStruct((x.shape[0], length) + tuple(x.shape[2:]), x.dtype)

    check_inputs(shape(q), shape(k), shape(v), mask, scale, softcap, block_q, block_k, sinks)
    if mask is not None:
        mask = mask.prepare(length, length, batch=q.shape[0], num_heads=q.shape[2])
    return mask, float(scale), None if softcap is None else float(softcap), length


def check_rules(rules):
    """rules: a mapping from logical axis names to mesh axes (lcm.sharding.DEFAULT_RULES)."""
    if not isinstance(rules, Mapping):
        raise ValueError(f"rules={rules!r}; expected a mapping from logical axis names to mesh "
                         f"axes, e.g. lcm.sharding.DEFAULT_RULES")
    return rules


def context_rules(rules, axis_name):
    """`rules` for context parallelism: the sequence over `axis_name` (whatever rules['seq']
    says), and `axis_name` taken out of every other rule."""
    def without(axes):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return tuple(a for a in axes if a != axis_name)

    return {**{name: without(axes) for name, axes in rules.items()}, "seq": axis_name}


def shard_specs(mesh, axis_name, q, k, mask: Mask | None, order, rules=DEFAULT_RULES):
    """(q spec, k/v spec, mask spec tree) by `lcm.sharding.logical_to_spec` over
    `context_rules(rules, axis_name)`: batch by rules['batch'], the sequence (padded to
    order.padded_length) over axis_name, heads by rules['kv_heads'] when those axes divide both
    H and K and the mask is the same for every head (`mask.per_head`); the batch stays whole
    when the mask reads the batch index (`mask.reads_batch_index`); head_dim whole (attention
    contracts over it). Other mesh axes replicate. The mask's arrays are laid out as
    `mask.shard_specs` says (segment ids follow the batch)."""
    B, _, _, D = q.shape
    heads = None if mask is not None and mask.per_head else "kv_heads"
    batch = None if mask is not None and mask.reads_batch_index else "batch"
    spec = logical_to_spec((batch, "seq", heads, None), (B, order.padded_length, k.shape[2], D),
                           mesh, context_rules(rules, axis_name))
    b = spec[0]
    # q's heads split like K's: H is a multiple of K, so axes that divide K divide H, and the
    # query heads of one KV group land on the device holding that KV head.
    qspec = spec

    mask_spec = PartitionSpec() if mask is None else mask.shard_specs(b)
    return qspec, qspec, mask_spec
