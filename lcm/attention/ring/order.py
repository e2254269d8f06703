"""Load balancing for context parallelism: which chunks of a sequence each device of a ring holds.

Under a causal mask, contiguous shards give device P-1 P times the work of device 0. A
`RingOrder` cuts the (padded) sequence into chunks of `chunk_size` tokens and gives each device
the same number of chunks:

- "none": device d holds chunk d (contiguous shards, the plain `seq -> context` sharding);
- "zigzag": 2P chunks, device d holds chunks d and 2P-1-d (Ring/Megatron's balanced causal);
- "striped": chunks of `stripe` tokens dealt round-robin, device d holds d, d+P, d+2P, ...
  (Striped Attention at block granularity, so the block layout stays exact);
- "mask_aware": chunks assigned from the mask's block layout so that every ring step costs
  every device about the same (for Local, SinkWindow, Document or any BlockMask, where zigzag
  does not balance).

Tokens in ring order are the concatenation of device 0's chunks, then device 1's, ...; sharding
that order contiguously over the context axis puts each device's chunks on it. `to_ring` and
`from_ring` move any per-token array (tokens, positions, segment ids, logits) between the
original order and the ring order; `positions()` are the original positions of ring-order tokens,
so a model fed ring-order tokens with these positions computes what it computes in order.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from lcm.attention.masks import BlockGeometry

LOAD_BALANCE = ("none", "zigzag", "striped", "mask_aware")


@dataclasses.dataclass(frozen=True)
class RingOrder:
    """Device d holds chunks[d] (in that order) of `chunk_size` tokens of a sequence of `length`
    tokens padded to `padded_length` = number of chunks * chunk_size. Hashable (static)."""

    chunks: tuple[tuple[int, ...], ...]
    chunk_size: int
    length: int
    load_balance: str = "none"

    def __post_init__(self):
        counts = {len(c) for c in self.chunks}
        flat = sorted(i for c in self.chunks for i in c)
        if len(counts) != 1 or flat != list(range(len(flat))):
            raise ValueError(f"RingOrder chunks={self.chunks}: every device needs the same number "
                             f"of chunks and the chunks must be 0..n-1, each once")
        if self.chunk_size <= 0 or not 0 < self.length <= self.padded_length:
            raise ValueError(f"RingOrder(chunk_size={self.chunk_size}, length={self.length}): "
                             f"expected 0 < length <= {self.padded_length}")

    @property
    def num_devices(self) -> int:
        return len(self.chunks)

    @property
    def chunks_per_device(self) -> int:
        return len(self.chunks[0])

    @property
    def num_chunks(self) -> int:
        return self.num_devices * self.chunks_per_device

    @property
    def padded_length(self) -> int:
        return self.num_chunks * self.chunk_size

    @property
    def shard_length(self) -> int:
        """Tokens per device."""
        return self.chunks_per_device * self.chunk_size

    def positions(self) -> np.ndarray:
        """Original position of each ring-order token, int32 [padded_length] (>= length: pad)."""
        c = self.chunk_size
        chunks = np.asarray(self.chunks, np.int32).reshape(-1)
        return (chunks[:, None] * c + np.arange(c, dtype=np.int32)[None]).reshape(-1)

    def to_ring(self, x, axis: int = 1, pad_value=0):
        """x with `length` entries on `axis` (original order) -> padded_length, in ring order."""
        _check_axis_length(x, axis, self.length, "to_ring")
        axis = axis % x.ndim
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, self.padded_length - self.length)
        x = jnp.pad(x, widths, constant_values=pad_value)
        return jnp.take(x, jnp.asarray(self.positions()), axis=axis)

    def from_ring(self, x, axis: int = 1):
        """Inverse of `to_ring`: padded_length entries in ring order -> `length`, original order."""
        _check_axis_length(x, axis, self.padded_length, "from_ring")
        inverse = np.argsort(self.positions())[: self.length].astype(np.int32)
        return jnp.take(x, jnp.asarray(inverse), axis=axis % x.ndim)


def _check_axis_length(x, axis, want, name):
    if getattr(x, "ndim", 0) == 0 or not -x.ndim <= axis < x.ndim or x.shape[axis] != want:
        raise ValueError(f"RingOrder.{name}: x shape {getattr(x, 'shape', None)} has no axis "
                         f"{axis} of length {want}")


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def make_ring_order(length: int, num_devices: int, load_balance: str = "zigzag", *,
                    block: int = 512, mask=None, stripe: int | None = None,
                    num_chunks: int | None = None) -> RingOrder:
    """The RingOrder of `load_balance` for `length` tokens over `num_devices` devices.

    Chunk sizes are rounded up to a multiple of `block` (the attention block size, so every
    block lies inside one chunk and the block layout of each (device, ring step) is a slice of
    the global one), or to the chunk itself when it is shorter than a block (then rounded to 8).
    "striped": `stripe` tokens per chunk (default: `block`). "mask_aware": `num_chunks` chunks
    (default 4 per device) assigned by the work of `mask` (a Mask whose arrays are concrete, e.g.
    Document over NumPy segment ids; None or a mask without structure gives zigzag's cost).
    """
    for name, value in (("length", length), ("num_devices", num_devices), ("block", block)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r}; expected a positive int")
    if load_balance not in LOAD_BALANCE:
        raise ValueError(f"load_balance={load_balance!r}; expected one of {list(LOAD_BALANCE)}")
    P = int(num_devices)
    if load_balance == "striped":
        stripe = block if stripe is None else stripe
        if not isinstance(stripe, (int, np.integer)) or isinstance(stripe, bool) or stripe <= 0:
            raise ValueError(f"stripe={stripe!r}; expected a positive int")
        stripe = int(stripe)
        per_device = -(-length // (P * stripe))
        chunks = tuple(tuple(d + P * i for i in range(per_device)) for d in range(P))
        return RingOrder(chunks, stripe, length, load_balance)
    if load_balance == "mask_aware":
        C = 4 * P if num_chunks is None else num_chunks
        if not isinstance(C, (int, np.integer)) or isinstance(C, bool) or C <= 0 or C % P:
            raise ValueError(f"num_chunks={num_chunks!r}; expected a positive multiple of "
                             f"num_devices={P}")
        C = int(C)
    else:
        C = P if load_balance == "none" else 2 * P
    size = chunk_size_for(length, C, block)
    if load_balance == "none":
        chunks = tuple((d,) for d in range(P))
    elif load_balance == "zigzag":
        chunks = tuple((d, 2 * P - 1 - d) for d in range(P))
    else:
        work = chunk_work(mask, C * size, length, size)
        chunks = balance_chunks(work, P)
    return RingOrder(chunks, size, length, load_balance)


def chunk_size_for(length: int, num_chunks: int, block: int) -> int:
    """The smallest chunk size >= length / num_chunks that whole blocks tile."""
    raw = -(-length // num_chunks)
    return _round_up(raw, min(block, _round_up(raw, 8)))


def chunk_work(mask, padded_length: int, length: int, chunk_size: int) -> np.ndarray:
    """work [C, C]: visible (query, key) pairs between query chunk a and key chunk b, float64.

    Counted exactly on a grid of cells of at most 64 tokens through the mask's block
    visibility (FULL cells count whole, PARTIAL ones half), over the concrete mask.
    """
    C = padded_length // chunk_size
    cell = math.gcd(chunk_size, 64)
    geom = BlockGeometry(length, length, cell, cell)
    if mask is None:
        any_ = all_ = np.ones((geom.num_q_blocks, geom.num_k_blocks), bool)
    else:
        try:
            any_, all_ = (np.asarray(a) for a in mask.prepare(length, length)
                          .block_visibility(geom))
        except Exception as e:  # a traced mask cannot give a static assignment
            raise ValueError("load_balance='mask_aware' needs a mask whose arrays are concrete "
                             "(NumPy or committed jax arrays, not traced inside jit)") from e
        any_, all_ = any_.any((0, 1)), all_.all((0, 1))
    w = np.where(all_, 1.0, np.where(any_, 0.5, 0.0))
    n = padded_length // cell
    padded = np.zeros((n, n))
    padded[: w.shape[0], : w.shape[1]] = w
    per = chunk_size // cell
    return padded.reshape(C, per, C, per).sum((1, 3))


def ring_cost(work: np.ndarray, chunks) -> float:
    """sum over ring steps of the slowest device's work: what a synchronised ring waits for."""
    chunks = np.asarray(chunks)
    P = len(chunks)
    per_pair = work[chunks[:, :, None, None], chunks[None, None, :, :]].sum((1, 3))  # [P, P]
    d = np.arange(P)
    return float(sum(per_pair[d, (d - s) % P].max() for s in range(P)))


def balance_chunks(work: np.ndarray, num_devices: int, *, passes: int = 4):
    """Chunks per device minimising `ring_cost`: zigzag-like start, then improving swaps."""
    C = work.shape[0]
    P, m = num_devices, C // num_devices
    # Start from the snake order (zigzag generalised to m chunks per device).
    order = [list(range(r * P, (r + 1) * P))[:: 1 if r % 2 == 0 else -1] for r in range(m)]
    chunks = np.asarray(order).T.copy()  # [P, m]
    best = ring_cost(work, chunks)
    for _ in range(passes):
        improved = False
        for a in range(P):
            for b in range(a + 1, P):
                for i in range(m):
                    for j in range(m):
                        chunks[a, i], chunks[b, j] = chunks[b, j], chunks[a, i]
                        cost = ring_cost(work, chunks)
                        if cost < best - 1e-9:
                            best, improved = cost, True
                        else:
                            chunks[a, i], chunks[b, j] = chunks[b, j], chunks[a, i]
        if not improved:
            break
    return tuple(tuple(int(c) for c in sorted(row)) for row in chunks)
