"""`segment_scan`: a `lax.scan` over segments carrying a memory pytree.

Every memory leaf has the batch on axis 0, so a per-example `start_of_sequence` mask resets it
with `jnp.where` (no Python control flow, one compiled program whatever the resets). Truncated
backpropagation through time cuts the carried gradient with `stop_gradient` every
`bptt_segments` segments, and the segment body runs under `jax.checkpoint`, so training keeps
one carry per segment rather than every activation of every segment.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lcm.checks import is_int


def segment_scan(step_fn: Callable, memory0, segments, *, memory=None, start_of_sequence=None,
                 bptt_segments: int | None = None, remat: bool = True):
    """Runs `step_fn(memory, segment) -> (memory, out)` over the leading axis of `segments`.

    memory0: the reset value, a pytree whose leaves are [B, ...]; `memory` the carry to start from
    (default memory0; pass a saved state to resume). segments: a pytree of [N, ...] leaves.
    start_of_sequence [N, B] bool: example b resets to memory0 before segment n. bptt_segments:
    gradients of the carry are cut before segments k, 2k, ...; None keeps them all. remat: run
    the body under `jax.checkpoint`. Returns (final memory, outs stacked on a leading N axis).
    """
    leaves = jax.tree.leaves(segments)
    if not leaves:
        raise ValueError("segments is an empty pytree; expected [num_segments, ...] arrays")
    num_segments = leaves[0].shape[0]
    if any(x.shape[:1] != (num_segments,) for x in leaves):
        raise ValueError(f"segments leaves have leading dims {[x.shape[:1] for x in leaves]}; "
                         f"expected one shared number of segments")
    if bptt_segments is not None and (not is_int(bptt_segments) or bptt_segments <= 0):
        raise ValueError(f"bptt_segments={bptt_segments!r}; expected a positive int or None")
    bptt_segments = None if bptt_segments is None else int(bptt_segments)
    memory = memory0 if memory is None else memory
    if jax.tree.structure(memory) != jax.tree.structure(memory0):
        raise ValueError(f"memory has structure {jax.tree.structure(memory)}; expected that of "
                         f"memory0 {jax.tree.structure(memory0)}")
    batch = {x.shape[0] for x in jax.tree.leaves(memory0)}
    if len(batch) > 1:
        raise ValueError(f"memory0 leaves have batch sizes {sorted(batch)} on axis 0; expected one")
    if start_of_sequence is not None:
        want = (num_segments, *batch)
        if start_of_sequence.shape != want or start_of_sequence.dtype != jnp.bool_:
            raise ValueError(f"start_of_sequence: shape {start_of_sequence.shape}, dtype "
                             f"{start_of_sequence.dtype}; expected bool [num_segments, batch] = "
                             f"{want}")

    def body(carry, xs):
        index, reset, segment = xs
        if reset is not None:
            carry = jax.tree.map(lambda m0, m: _where_batch(reset, m0, m), memory0, carry)
        if bptt_segments is not None:
            cut = (index > 0) & (index % bptt_segments == 0)
            carry = jax.tree.map(lambda m: jnp.where(cut, lax.stop_gradient(m), m), carry)
        return step_fn(carry, segment)

    if remat:
        body = jax.checkpoint(body)
    xs = (jnp.arange(num_segments, dtype=jnp.int32), start_of_sequence, segments)
    return lax.scan(body, memory, xs)


def _where_batch(mask, a, b):
    """where(mask[b], a, b) with mask [B] broadcast over the trailing dims of [B, ...] leaves."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (b.ndim - 1)), a, b)
