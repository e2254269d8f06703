"""Position augmentation for long-context fine-tuning on short sequences: PoSE and E²-LLM.

Both are data-side transforms: they produce the RoPE position ids (and, for E²-LLM, a scale)
of a training chunk of `chunk_len` tokens so that, over many samples, the model sees the
positions and relative distances of a `target_len` window while attention stays `chunk_len`
long. All functions are pure functions of a JAX key, jit-able with static lengths.

PoSE (Zhu et al. 2023, "PoSE: Efficient Context Window Extension of LLMs via Positional
Skip-wise Training"): split the chunk into N contiguous parts c_0..c_{N-1} (lengths l_i > 0,
summing to chunk_len); part i keeps consecutive positions shifted by a skipping bias u_i:

    pos(c_i) = { st_i + u_i + j : j = 0 .. l_i - 1 },   st_i = l_0 + ... + l_{i-1},
    u_0 = 0 (the reference code's revision; the paper samples it like the others),
    u_i ~ U{u_{i-1}, ..., target_len - chunk_len},

so positions are increasing and the last is at most target_len - 1. Part lengths: N - 1 cut
points drawn uniformly without replacement from {1, ..., chunk_len - 1}. (The authors' code
uses N = 2 with the first part's length drawn from {1, ..., (chunk_len + 1) // 2}; pass
`max_first_len` for that.) PoSE pairs this with a RoPE scaling (PI, NTK, YaRN) whose factor
maps target_len to the original window.

E²-LLM (Liu et al. 2024, "E²-LLM: Efficient and Extreme Length Extension of Large Language
Models"), as an augmentation of position interpolation: each sample draws a scale s from
`scales` and a position offset δ ~ U{0, ..., s * chunk_len - chunk_len}, and is trained with
positions δ + 0 .. δ + chunk_len - 1 under RoPE interpolated by s (inv_freq / s), so the
interpolated positions (δ + j) / s stay inside the original window while one model learns
every scale. lcm applies the scale as the RoPE `linear` factor, one per step (the forward pass
has one RoPE table): `e2llm_positions` returns the positions and the scale for the step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcm.checks import check_int


def skip_positions(chunk_len: int, cuts, biases):
    """Positions of a chunk split at `cuts` with per-part skipping `biases`.

    cuts [..., N-1] int: increasing part starts in [1, chunk_len); biases [..., N] int: u_i.
    Returns int32 [..., chunk_len]: position j of part i is j + biases[i].
    """
    cuts, biases = jnp.asarray(cuts, jnp.int32), jnp.asarray(biases, jnp.int32)
    idx = jnp.arange(chunk_len, dtype=jnp.int32)
    lead = cuts.shape[:-1]
    idx_b = idx.reshape((1,) * len(lead) + (chunk_len, 1))
    part = jnp.sum(idx_b >= cuts[..., None, :], axis=-1)  # [..., chunk_len]: the part of j
    return idx.reshape((1,) * (part.ndim - 1) + (-1,)) + jnp.take_along_axis(biases, part, -1)


def pose_sample(key, chunk_len: int, target_len: int, *, num_chunks: int = 2,
                anchor_start: bool = True, max_first_len: int | None = None):
    """Draws PoSE's cut points [N-1] and skipping biases [N] (see the module doc)."""
    _check(chunk_len, target_len, num_chunks)
    key_cut, key_bias = jax.random.split(key)
    if max_first_len is not None:
        if num_chunks != 2 or not 1 <= max_first_len < chunk_len:
            raise ValueError(f"max_first_len={max_first_len!r}; needs num_chunks=2 and "
                             f"1 <= max_first_len < chunk_len={chunk_len}")
        cuts = jax.random.randint(key_cut, (1,), 1, max_first_len + 1)
    else:
        cuts = jnp.sort(jax.random.choice(key_cut, chunk_len - 1, (num_chunks - 1,),
                                          replace=False) + 1)
    span = target_len - chunk_len
    keys = jax.random.split(key_bias, num_chunks)
    biases = [jnp.zeros((), jnp.int32) if anchor_start
              else jax.random.randint(keys[0], (), 0, span + 1)]
    for i in range(1, num_chunks):
        biases.append(jax.random.randint(keys[i], (), biases[-1], span + 1))
    return cuts.astype(jnp.int32), jnp.stack(biases).astype(jnp.int32)


def pose_positions(key, chunk_len: int, target_len: int, *, batch_size: int | None = None,
                   num_chunks: int = 2, anchor_start: bool = True,
                   max_first_len: int | None = None):
    """PoSE position ids: int32 [chunk_len], or [batch_size, chunk_len] with one draw per row.

    Values are increasing, consecutive within each part, and below `target_len`.
    """
    def one(k):
        cuts, biases = pose_sample(k, chunk_len, target_len, num_chunks=num_chunks,
                                   anchor_start=anchor_start, max_first_len=max_first_len)
        return skip_positions(chunk_len, cuts, biases)

    if batch_size is None:
        return one(key)
    return jax.vmap(one)(jax.random.split(key, batch_size))


def e2llm_positions(key, chunk_len: int, scales, *, batch_size: int | None = None):
    """E²-LLM augmentation: `(positions, scale)` for one step (see the module doc).

    scales: the interpolation factors to draw from (e.g. (1, 2, 4, 8)). positions int32
    [chunk_len] or [batch_size, chunk_len] (one offset per row) are delta + 0..chunk_len-1 with
    delta ~ U{0, ..., (scale - 1) * chunk_len}; scale float32 [] is to be applied as the RoPE
    linear factor (positions / scale stay below chunk_len).
    """
    scales = tuple(scales)
    if not scales or any(not isinstance(s, (int, float, np.integer, np.floating))
                         or isinstance(s, (bool, np.bool_)) or not 1 <= s < math.inf
                         for s in scales):
        raise ValueError(f"scales={scales!r}; expected numbers >= 1 (finite)")
    check_int(None, "chunk_len", chunk_len, 1)
    chunk_len = int(chunk_len)
    key_scale, key_offset = jax.random.split(key)
    scale = jax.random.choice(key_scale, jnp.asarray(scales, jnp.float32))
    top = jnp.floor((scale - 1) * chunk_len).astype(jnp.int32)
    shape = () if batch_size is None else (batch_size,)
    # randint's maxval is exclusive: offsets 0..top.
    offset = jax.random.randint(key_offset, shape, 0, top + 1)
    steps = jnp.arange(chunk_len, dtype=jnp.int32).reshape((1,) * len(shape) + (chunk_len,))
    return offset[..., None] + steps, scale


def _check(chunk_len, target_len, num_chunks):
    for name, value in (("chunk_len", chunk_len), ("target_len", target_len),
                        ("num_chunks", num_chunks)):
        check_int(None, name, value, 1)
    if target_len < chunk_len:
        raise ValueError(f"target_len={target_len} < chunk_len={chunk_len}; PoSE stretches a "
                         f"chunk over a longer window")
    if num_chunks > chunk_len:
        raise ValueError(f"num_chunks={num_chunks} > chunk_len={chunk_len}; every part needs a "
                         f"token")
