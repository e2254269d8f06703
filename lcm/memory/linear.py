"""Gated linear attention with a scalar decay per head and token (Mamba-2's SSD, GLA's form).

    S_t = a_t S_{t-1} + k_t^T v_t        (per KV head, S [D, D])
    o_t = q_t S_t

Three exact forms: `linear_attention_step` (one token: decoding), `chunked_linear_attention`
(quadratic within chunks of `chunk_size` tokens, recurrent across chunks: training), and
`quadratic_linear_attention` (one masked T x T matrix: the reference). Decays enter as
log a_t <= 0 and are combined as differences of cumulative sums that are never positive, so
nothing overflows. `LinearRecurrence` makes every layer of the decoder such a layer (its
q, k, v projections reused, q and k L2-normalised, decay from a learned projection of the layer
input), with the state carried across segments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lcm.memory.base import Memory, f32, grouped
from lcm.model import WeightSpec

# Decays start near exp(-softplus(-5)) ~ 0.993 per token (Mamba-2 draws its initial dt small
# too), so a fresh layer remembers for ~150 tokens rather than 2.
_DECAY_OFFSET = -5.0


def linear_attention_step(q, k, v, log_decay, state):
    """One token. q [B, H, D]; k, v [B, K, D]; log_decay [B, K] (<= 0); state [B, K, D, D]
    float32. Returns (o [B, H, D] float32, state)."""
    B, H, D = q.shape
    K = k.shape[1]
    state = (jnp.exp(log_decay.astype(f32))[..., None, None] * state
             + jnp.einsum("bkd,bke->bkde", k.astype(f32), v.astype(f32)))
    o = jnp.einsum("bkgd,bkde->bkge", q.astype(f32).reshape(B, K, H // K, D), state)
    return o.reshape(B, H, -1), state


def quadratic_linear_attention(q, k, v, log_decay, state=None):
    """The reference: o_t = sum_{s<=t} exp(c_t - c_s) (q_t . k_s) v_s + exp(c_t) q_t S_0 with
    c the cumulative log decay. q [B, T, H, D]; k, v [B, T, K, D]; log_decay [B, T, K]."""
    B, T, H, D = q.shape
    c = jnp.cumsum(log_decay.astype(f32), 1)  # [B, T, K]
    qg = grouped(q.astype(f32), k.shape[2])
    diff = c[:, :, None, :] - c[:, None, :, :]  # [B, t, s, K]
    causal = (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])[None, :, :, None]
    w = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    scores = jnp.einsum("btkgd,bskd->btskg", qg, k.astype(f32)) * w[..., None]
    o = jnp.einsum("btskg,bske->btkge", scores, v.astype(f32))
    if state is not None:
        o = o + jnp.einsum("btkgd,bkde->btkge", qg * jnp.exp(c)[..., None, None], state)
    return o.reshape(B, T, H, -1)


def chunked_linear_attention(q, k, v, log_decay, state, *, chunk_size):
    """Chunk-parallel form: (o [B, T, H, D] float32, final state [B, K, D, D] float32).

    Shapes as `quadratic_linear_attention`; state [B, K, D, D] float32 (zeros for a fresh
    sequence). T need not be a multiple of chunk_size (padded with no-op tokens: k = 0, a = 1).
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    c_len = min(chunk_size, T)
    n = -(-T // c_len)
    pad = n * c_len - T

    def chunks(x):
        x = jnp.pad(x.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, n, c_len, *x.shape[2:])

    qc = chunks(q).reshape(B, n, c_len, K, H // K, D)
    kc, vc, ld = chunks(k), chunks(v), chunks(log_decay)
    c = jnp.cumsum(ld, 2)  # [B, n, c, K]: cumulative log decay within each chunk
    causal = (jnp.arange(c_len)[:, None] >= jnp.arange(c_len)[None, :])[None, None, :, :, None]
    diff = c[:, :, :, None, :] - c[:, :, None, :, :]  # [B, n, i, j, K]
    w = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    scores = jnp.einsum("bnikgd,bnjkd->bnijkg", qc, kc) * w[..., None]
    intra = jnp.einsum("bnijkg,bnjke->bnikge", scores, vc)
    # What each chunk adds to the state, decayed to the chunk's end.
    last = c[:, :, -1]  # [B, n, K]
    to_end = jnp.exp(last[:, :, None] - c)  # [B, n, c, K]
    chunk_kv = jnp.einsum("bnjk,bnjkd,bnjke->bnkde", to_end, kc, vc)

    def across(s, xs):
        kv, decay = xs
        return jnp.exp(decay)[..., None, None] * s + kv, s

    final, s_in = lax.scan(across, state.astype(f32),
                           (jnp.moveaxis(chunk_kv, 1, 0), jnp.moveaxis(last, 1, 0)))
    s_in = jnp.moveaxis(s_in, 0, 1)  # [B, n, K, D, D]: the state entering each chunk
    inter = jnp.einsum("bnikgd,bnkde->bnikge", qc * jnp.exp(c)[..., None, None], s_in)
    o = (intra + inter).reshape(B, n * c_len, H, D)[:, :T]
    return o, final


@dataclasses.dataclass(frozen=True)
class LinearRecurrence(Memory):
    """Every layer's softmax attention becomes gated linear attention with a carried state.

    Params "layers": decay [layers, hidden, kv_heads], decay_bias [layers, kv_heads] (log a_t =
    -softplus(h W + b - 5)). State "layers": S [B, layers, kv_heads, D, D] float32. A model
    trained this way decodes token by token with `linear_attention_step` (segment_len=1).
    """

    chunk_size: int = 64

    def __post_init__(self):
        self._check_ints(1, "chunk_size")

    def param_specs(self, cfg):
        L, E, K = cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads
        return {"layers": {
            "decay": WeightSpec((L, E, K), ("layers", "embed", "kv_heads"), fan_in=E),
            "decay_bias": WeightSpec((L, K), ("layers", "kv_heads"), "zeros")}}

    def init(self, cfg, batch, memory_params):
        K, D = cfg.num_kv_heads, cfg.head_dim
        return {"layers": {"S": jnp.zeros((batch, cfg.num_layers, K, D, D), f32)}}

    def _inputs(self, params, h, q, k, ctx):
        q = _l2_normalise(q)
        # Padding is a no-op: no input and no decay.
        k = _l2_normalise(k) * ctx.valid[:, :, None, None]
        pre = jnp.einsum("bte,ek->btk", h.astype(f32), params["decay"].astype(f32))
        log_decay = -jax.nn.softplus(pre + params["decay_bias"].astype(f32)[None, None]
                                     + _DECAY_OFFSET)
        return q, k, log_decay * ctx.valid[:, :, None]

    def layer(self, state, params, h, q, k, v, ctx):
        q, k, log_decay = self._inputs(params, h, q, k, ctx)
        if q.shape[1] == 1:  # decoding: the step form
            o, s = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], state["S"])
            o = o[:, None]
        else:
            o, s = chunked_linear_attention(q, k, v, log_decay, state["S"],
                                            chunk_size=self.chunk_size)
        return o.astype(v.dtype), {"S": s}

    def read(self, state, params, h, q, k, v, ctx):
        return self.layer(state, params, h, q, k, v, ctx)[0]

    def write(self, state, params, h, q, k, v, ctx):
        return self.layer(state, params, h, q, k, v, ctx)[1]


def _l2_normalise(x):
    xf = x.astype(f32)
    return xf * lax.rsqrt(jnp.sum(xf * xf, -1, keepdims=True) + 1e-6)
