"""attend(impl="pallas") (the TPU kernel interpreted on CPU) against the reference and xla."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.attention import (BlockMask, Causal, Chunked, Document, Local, PrefixLM, SinkWindow,
                           VerticalSlash, attend)

B, T, S, H, K, D = 2, 45, 61, 4, 2, 32


def inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, S, K, D))
    v = jax.random.normal(ks[2], (B, S, K, D))
    seg = np.sort(np.random.default_rng(seed).integers(0, 3, (B, S)), axis=1).astype(np.int32)
    return q, k, v, Document(jnp.asarray(seg[:, S - T:]), jnp.asarray(seg))


MASKS = {
    "none": lambda doc: None,
    "causal": lambda doc: Causal(),
    "local": lambda doc: Local(9),
    "sinkwindow|document": lambda doc: SinkWindow(4, 16) | doc,
    "chunked": lambda doc: Chunked(16),
    "prefixlm&document": lambda doc: PrefixLM(20) & doc,
    "causal&document": lambda doc: Causal() & doc,
    "blockmask&causal": lambda doc: BlockMask(
        np.random.default_rng(1).random((3, 4)) < 0.5, 16) & Causal(),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_pallas_matches_reference_and_xla(name):
    q, k, v, doc = inputs()
    mask = MASKS[name](doc)
    cot = jnp.cos(jnp.arange(D, dtype=jnp.float32))[None, None, None]

    def run(impl):
        fn = lambda q, k, v: jnp.sum(  # noqa: E731
            attend(q, k, v, mask, impl=impl, block_q=16, block_k=16, softcap=20.0) * cot)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, k, v)

    want, want_grads = run("reference")
    for impl in ("pallas", "xla"):
        got, got_grads = run(impl)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=impl)
        for g, w in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, w, atol=3e-5, rtol=3e-5, err_msg=impl)


def test_pallas_bfloat16_forward():
    q, k, v, doc = inputs(1)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = attend(q, k, v, Causal() & doc, impl="pallas", block_q=16, block_k=16)
    want = attend(q, k, v, Causal() & doc, impl="reference")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=3e-2, rtol=3e-2)


def test_pallas_rejects_masks_it_cannot_evaluate():
    q, k, v, _ = inputs()
    vs = VerticalSlash(jnp.zeros((H, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="VerticalSlash"):
        attend(q, k, v, vs, impl="pallas", block_q=16, block_k=16)
    per_head = BlockMask(np.ones((H, 3, 4), bool), 16)
    with pytest.raises(ValueError, match="grouped query heads"):
        attend(q, k, v, per_head, impl="pallas", block_q=16, block_k=16)
    unaligned = BlockMask(np.ones((6, 8), bool), 8)
    with pytest.raises(ValueError, match="whole kernel blocks"):
        attend(q, k, v, unaligned, impl="pallas", block_q=16, block_k=16)
