"""Nothing silent in attention: a catalogue of bad inputs (each a ValueError naming the argument),
inputs that must be accepted (NumPy scalars, eager ring padding), and NaN / inf propagation on
every backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import block_kinds, random_qkv

from lcm.attention import Causal, Document, Local, MaskFn, attend, ring_attention
from lcm.kernels.block_sparse.gpu import block_sparse_attention_gpu
from lcm.kernels.block_sparse.layout import layout_from_kinds
from lcm.kernels.block_sparse.reference import dense_mask
from lcm.positions import alibi_slopes
from lcm.sharding import make_mesh

Q, K, V = random_qkv(jax.random.key(0), 1, 16, 16, 2, 1, 8, jnp.float32)


def ring_mesh(P):
    return make_mesh((1, 1, 1, P), devices=jax.devices()[:P])


# (id, call, regex the ValueError's message must match: it names the argument or the value)
ERRORS = [
    ("q_3d", lambda: attend(Q[0], K, V), r"q has shape \(16, 2, 8\); expected 4 dims"),
    ("k_int", lambda: attend(Q, K.astype(jnp.int32), V), r"k.dtype=int32"),
    ("kv_shapes", lambda: attend(Q, K, V[:, :8]), r"k \(1, 16, 1, 8\) and v \(1, 8, 1, 8\)"),
    ("head_dim", lambda: attend(Q, K[..., :4], V[..., :4]), r"k/v shape .* does not fit q"),
    ("empty", lambda: attend(Q[:, :0], K, V), r"empty dimension in q \(1, 0, 2, 8\)"),
    ("heads", lambda: attend(jnp.concatenate([Q, Q[:, :, :1]], 2), K[:, :, :1].repeat(2, 2),
                             V[:, :, :1].repeat(2, 2)), r"q has 3 heads, not a multiple"),
    ("q_len", lambda: attend(Q, K[:, :8], V[:, :8]), r"q_len=16 > kv_len=8"),
    ("mask_str", lambda: attend(Q, K, V, "causal"), r"mask='causal'; expected None or a Mask"),
    ("document_shape", lambda: attend(Q, K, V, Document(jnp.zeros((1, 8), jnp.int32))),
     r"Document"),
    ("scale_negative", lambda: attend(Q, K, V, scale=-1.0), r"scale=-1.0; expected a positive"),
    ("scale_nan", lambda: attend(Q, K, V, scale=float("nan")), r"scale=nan"),
    ("scale_str", lambda: attend(Q, K, V, scale="0.1"), r"scale='0.1'"),
    ("softcap_zero", lambda: attend(Q, K, V, softcap=0.0), r"softcap=0.0"),
    ("softcap_inf", lambda: attend(Q, K, V, softcap=float("inf")), r"softcap=inf"),
    ("block_q_zero", lambda: attend(Q, K, V, impl="xla", block_q=0), r"block_q=0"),
    ("block_k_float", lambda: attend(Q, K, V, impl="xla", block_k=8.0), r"block_k=8.0"),
    ("block_q_bool", lambda: attend(Q, K, V, impl="xla", block_q=True), r"block_q=True"),
    ("impl", lambda: attend(Q, K, V, impl="flash"), r"impl='flash'; expected one of"),
    ("impl_none", lambda: attend(Q, K, V, impl=None), r"impl=None"),
    ("mesh_without_ring", lambda: attend(Q, K, V, impl="xla", mesh=ring_mesh(2)),
     r"mesh= is for impl in"),
    ("rules_without_ring", lambda: attend(Q, K, V, impl="xla", rules={}), r"rules= is for impl"),
    ("alibi_shape", lambda: attend(Q, K, V, alibi_slopes=[1.0]), r"alibi_slopes has shape \(1,\)"),
    ("alibi_nan", lambda: attend(Q, K, V, alibi_slopes=[1.0, float("nan")]),
     r"alibi_slopes=\[1.0, nan\]; expected finite"),
    ("alibi_ring", lambda: attend(Q, K, V, impl="ring", mesh=ring_mesh(2),
                                  alibi_slopes=alibi_slopes(2)), r"alibi_slopes with impl='ring'"),
    ("sinks_shape", lambda: attend(Q, K, V, sinks=jnp.zeros(3)), r"sinks has shape \(3,\)"),
    ("sinks_int", lambda: attend(Q, K, V, sinks=jnp.zeros(2, jnp.int32)), r"sinks .* int32"),
    ("local_window", lambda: Local(0), r"Local\(window=0\)"),
    ("ring_axis", lambda: ring_attention(Q, K, V, mesh=ring_mesh(2), axis_name="seq"),
     r"axis_name='seq' is not an axis"),
    ("ring_load_balance", lambda: attend(Q, K, V, impl="ring", mesh=ring_mesh(2),
                                         load_balance="spiral"), r"load_balance='spiral'"),
    ("ring_q_len", lambda: attend(Q[:, :8], K, V, impl="ring", mesh=ring_mesh(2)),
     r"q_len=8 != kv_len=16"),
    ("ring_strategy", lambda: ring_attention(Q, K, V, mesh=ring_mesh(2), strategy="ulysses"),
     r"strategy='ulysses'"),
    ("ring_pallas_length", lambda: attend(Q[:, :13], K[:, :13], V[:, :13], impl="ring_pallas",
                                          mesh=ring_mesh(8)), r"sequence length \(13\)"),
    ("ring_pallas_softcap", lambda: attend(Q, K, V, impl="ring_pallas", mesh=ring_mesh(2),
                                           softcap=5.0), r"softcap with strategy='pallas'"),
]


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i) for i, c, m in ERRORS])
def test_bad_input_raises_a_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numpy_scalars_are_accepted():
    want = attend(Q, K, V, Causal(), impl="reference", scale=0.25)
    got = attend(Q, K, V, Causal(), impl="xla", block_q=np.int64(8), block_k=np.int32(8),
                 scale=np.float32(0.25))
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_eager_ring_pads_an_indivisible_length_as_jit_does():
    """13 tokens over 8 devices: eager used to raise IndivisibleError from the output's
    placement (ring and allgather share it); jit padded. Both now pad and agree with the
    reference."""
    q, k, v = (x[:, :13] for x in (Q, K, V))
    want = attend(q, k, v, Causal(), impl="reference")
    got = attend(q, k, v, Causal(), impl="ring", mesh=ring_mesh(8), block_q=8, block_k=8)
    np.testing.assert_allclose(got, want, atol=3e-6)


# NaN / inf propagation. Rows 0-3 see no key (fully masked); the mask is causal from row 4 on.
NAN_MASK = Causal() & MaskFn(lambda b, h, q, k: q >= 4)
MASKED = np.arange(16) < 4
BACKENDS = {
    "reference": dict(impl="reference"),
    "xla": dict(impl="xla"),
    "xla_block4": dict(impl="xla", block_q=4, block_k=4),
    "pallas": dict(impl="pallas"),
    "ring": dict(impl="ring", block_q=8, block_k=8),
    "allgather": dict(impl="allgather", block_q=8, block_k=8),
}


def bad_inputs(case):
    """(q, k, v) with one bad entry, and the rows that attend to it."""
    q, k, v = Q, K, V
    rows = np.arange(16)
    if case == "nan_q":  # query 6
        return q.at[:, 6].set(jnp.nan), k, v, rows == 6
    if case == "nan_k":  # key 6, seen by queries 6..15
        return q, k.at[:, 6].set(jnp.nan), v, rows >= 6
    if case == "inf_k":  # +inf key 6 with positive queries: +inf logits for queries 6..15
        return jnp.abs(q), k.at[:, 6].set(jnp.inf), v, rows >= 6
    return q, k, v.at[:, 15].set(jnp.nan), rows == 15  # nan_v: key 15, seen by query 15


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_nan_and_inf_reach_every_row_that_attends_to_them(backend):
    options = dict(BACKENDS[backend])
    if options["impl"] in ("ring", "allgather"):
        options["mesh"] = ring_mesh(2)
    check_propagation(jax.jit(lambda q, k, v: attend(q, k, v, NAN_MASK, **options)))


def test_gpu_kernel_keeps_nan_rows():
    """The Triton kernel (impl='pallas' on a GPU), interpreted: the same NaN rules."""
    def mask_fn(qi, ki, qs, ks):
        return (qi >= ki) & (qi >= 4)

    kinds = block_kinds(dense_mask(mask_fn, 16, 16), 16, 16)
    kv_blocks, counts = layout_from_kinds(kinds)
    check_propagation(jax.jit(lambda q, k, v: block_sparse_attention_gpu(
        q, k, v, kinds=kinds, kv_blocks=kv_blocks, counts=counts, mask_fn=mask_fn,
        scale=8 ** -0.5, block_q=16, block_k=16, interpret=True)))


def check_propagation(run):
    """run(q, k, v) jitted (one compile) on each bad entry: NaN in every row that attends to it
    (and, but for NaN in v, in no other row); rows 0-3 (fully masked) exactly zero."""
    for case in ("nan_q", "nan_k", "inf_k", "nan_v"):
        q, k, v, attending = bad_inputs(case)
        out = np.asarray(run(q, k, v))
        nan_rows = np.isnan(out).any(axis=(0, 2, 3))
        assert nan_rows[attending].all(), (case, np.flatnonzero(nan_rows))
        assert (out[:, MASKED] == 0).all(), (case, "fully masked rows must stay zero")
        if case == "nan_v":  # other rows may follow IEEE 0 * NaN, per query block
            continue
        assert (nan_rows == attending).all(), (case, np.flatnonzero(nan_rows))
        assert np.isfinite(out[:, ~attending]).all(), case
