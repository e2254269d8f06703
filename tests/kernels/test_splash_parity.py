"""Peer check: lcm's block-sparse Pallas TPU kernel against JAX's splash attention.

Both run the TPU kernels in Pallas' CPU interpret mode: lcm through attend(impl="pallas"), splash
through jax.experimental.pallas.ops.tpu.splash_attention (shipped with jax itself), on the masks
splash supports: causal (also with queries aligned to the end of longer keys), local windows,
causal + segment ids, GQA / MQA, logit softcapping and attention sinks (one logit per query
head). Forward outputs and gradients of q, k, v (and of the sinks) must agree.

Conventions mapped here:
  * layout: lcm takes q [B, T, H, D], k/v [B, S, K, D]; splash takes one example, q [H, T, D] and
    k/v [K, S, D] (MHA/GQA) or [S, D] (MQA), so it is vmapped over the batch;
  * scale: splash does not scale the logits, so its q is pre-scaled by 1/sqrt(D) (lcm's default)
    inside the differentiated function; softcap then caps the same scaled logits in both;
  * Local(w): a query at p sees keys p - w + 1 .. p, i.e. splash LocalMask(window_size=(w - 1, 0));
  * queries sit at key position i + S - T in lcm: splash masks take offset=S - T;
  * sinks: both add the sink logit, uncapped, to each row's normaliser after scale and cap.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from lcm.attention import Causal, Document, Local, attend

BLOCK = 128  # splash's default tiles; lcm uses the same, except where a case says otherwise
FWD_ATOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 2e-5, 1e-5


def _case(*, T, S, H, K, window=None, segments=False, softcap=None, lcm_blocks=(BLOCK, BLOCK),
          sinks=False):
    return dict(T=T, S=S, H=H, K=K, window=window, segments=segments, softcap=softcap,
                lcm_blocks=lcm_blocks, sinks=sinks)


CASES = {
    "causal_gqa": _case(T=256, S=256, H=4, K=2),
    # Decode-style alignment (T < S) and lcm tiles different from splash's.
    "causal_offset_mha": _case(T=256, S=512, H=2, K=2, lcm_blocks=(256, 128)),
    # A window that is no multiple of the block: full, partial and skipped blocks all occur.
    "local_gqa": _case(T=512, S=512, H=4, K=2, window=100),
    "causal_segments_gqa": _case(T=256, S=256, H=4, K=2, segments=True),
    "local_mqa": _case(T=256, S=256, H=4, K=1, window=37),
    "causal_softcap_gqa": _case(T=256, S=256, H=4, K=2, softcap=5.0),
    "local_offset_softcap_sinks_gqa": _case(T=256, S=384, H=4, K=2, window=100, softcap=5.0,
                                            sinks=True),
}


def _inputs(c, seed):
    B, D = 2, 64
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, c["T"], c["H"], D), jnp.float32)
    k = jax.random.normal(ks[1], (B, c["S"], c["K"], D), jnp.float32)
    v = jax.random.normal(ks[2], (B, c["S"], c["K"], D), jnp.float32)
    # Each example its own cotangent, so gradients see every output element with its own weight.
    cot = jax.random.normal(ks[3], q.shape, jnp.float32)
    seg = None
    rng = np.random.default_rng(seed)
    if c["segments"]:
        # Packed documents: sorted ids, boundaries at random (block-unaligned) positions.
        seg = np.sort(rng.integers(0, 5, (B, c["S"])), axis=1).astype(np.int32)
    # Sink logits of both signs, some above typical logits: the sink's weight matters.
    sinks = jnp.asarray(rng.standard_normal(c["H"]) * 3, jnp.float32) if c["sinks"] else None
    return q, k, v, cot, seg, sinks


def _masks(c):
    """(lcm Mask, splash per-head Mask) for a case."""
    T, S = c["T"], c["S"]
    offset = S - T
    if c["window"] is not None:
        lcm_mask = Local(c["window"])
        head = splash.LocalMask((T, S), window_size=(c["window"] - 1, 0), offset=offset)
    else:
        lcm_mask = Causal()
        head = splash.CausalMask((T, S), offset=offset)
    return lcm_mask, splash.MultiHeadMask([head] * c["H"])


def _lcm_fn(c, lcm_mask, seg):
    if seg is not None:
        seg = jnp.asarray(seg)
        lcm_mask = lcm_mask & Document(seg[:, c["S"] - c["T"]:], seg)
    bq, bk = c["lcm_blocks"]

    def fn(q, k, v, sinks=None):
        return attend(q, k, v, lcm_mask, impl="pallas", softcap=c["softcap"], block_q=bq,
                      block_k=bk, sinks=sinks)
    return fn


def _splash_fn(c, splash_mask, seg):
    make = splash.make_splash_mqa if c["K"] == 1 else splash.make_splash_mha
    kernel = make(splash_mask, block_sizes=splash.BlockSizes.get_default(), head_shards=1,
                  q_seq_shards=1, attn_logits_soft_cap=c["softcap"], interpret=True)
    mqa = c["K"] == 1

    def one(q, k, v, seg_ids, sinks):  # q [T, H, D], k/v [S, K, D], seg_ids [S] or None
        scale = 1.0 / math.sqrt(q.shape[-1])
        q = q.transpose(1, 0, 2) * scale
        k, v = (x[:, 0] if mqa else x.transpose(1, 0, 2) for x in (k, v))
        ids = None
        if seg_ids is not None:
            ids = splash.SegmentIds(q=seg_ids[c["S"] - c["T"]:], kv=seg_ids)
        return kernel(q, k, v, segment_ids=ids, sinks=sinks).transpose(1, 0, 2)

    def fn(q, k, v, sinks=None):
        if seg is None:
            return jax.vmap(lambda q, k, v: one(q, k, v, None, sinks))(q, k, v)
        return jax.vmap(lambda q, k, v, s: one(q, k, v, s, sinks))(q, k, v, jnp.asarray(seg))
    return fn


def _out_and_grads(fn, q, k, v, cot, sinks=None):
    """Forward output and the gradients of sum(out * cot) w.r.t. q, k, v (and the sinks, when
    given), in one jit."""
    def run(cot, *args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cot)
    return jax.jit(run)(cot, q, k, v, *(() if sinks is None else (sinks,)))


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_matches_splash(name):
    c = CASES[name]
    q, k, v, cot, seg, sinks = _inputs(c, seed=list(CASES).index(name))
    lcm_mask, splash_mask = _masks(c)

    # The convention mapping itself: both masks must name the same (query, key) pairs.
    T, S = c["T"], c["S"]
    want_vis = np.asarray(lcm_mask.visible(np.arange(T), np.arange(S), S - T))[0, 0]
    np.testing.assert_array_equal(splash_mask.masks[0][:, :], want_vis)

    got, got_grads = _out_and_grads(_lcm_fn(c, lcm_mask, seg), q, k, v, cot, sinks)
    want, want_grads = _out_and_grads(_splash_fn(c, splash_mask, seg), q, k, v, cot, sinks)
    np.testing.assert_allclose(got, want, atol=FWD_ATOL, rtol=0, err_msg=f"{name}: forward")
    assert len(got_grads) == (4 if c["sinks"] else 3)
    for arg, g, w in zip(["q", "k", "v", "sinks"], got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=GRAD_ATOL, rtol=GRAD_RTOL,
                                   err_msg=f"{name}: d{arg}")
