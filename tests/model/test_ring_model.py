"""The decoder with its sequence sharded on `context` (ring attention) equals the unsharded one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jax.extend

from lcm.attention import Causal, attend
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import forward, init_params
from lcm.sharding import LogicalSharding, make_mesh, shard_params

CFG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
RING = dataclasses.replace(CFG, attention=AttentionConfig(impl="ring", block_q=8, block_k=8))


@pytest.fixture(scope="module")
def model():
    params, axes = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, CFG.vocab_size)
    # Documents cross the shard boundaries of every mesh below.
    segs = (jnp.arange(48)[None] >= jnp.asarray([[13], [29]])).astype(jnp.int32)
    return params, axes, tokens, segs


def loss(params, tokens, segs, cfg, shard=None):
    logits = forward(params, tokens, cfg, segment_ids=segs, shard=shard)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                         tokens[:, 1:, None], -1))


def _sharded_inputs(params, axes, tokens, segs, mesh):
    sharded = shard_params(params, axes, mesh)
    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "context"))
    return sharded, jax.device_put(tokens, spec), jax.device_put(segs, spec)


def _assert_grads_close(got, want):
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for key in path:
            w = w[key.key]
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-4,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("shape,load_balance", [((2, 1, 1, 4), "zigzag"),
                                                ((1, 1, 1, 8), "striped"),
                                                ((1, 1, 1, 8), "none")])
def test_balanced_model_matches_unsharded(devices, model, shape, load_balance):
    """Forward and gradients of the model balanced once at its input (AttentionConfig's
    load_balance) on 2x4 and 1x8 (data x context) meshes equal the unsharded ones."""
    params, axes, tokens, segs = model
    cfg = dataclasses.replace(RING, attention=dataclasses.replace(
        RING.attention, load_balance=load_balance))
    want = jax.jit(forward, static_argnames="cfg")(params, tokens, CFG, segment_ids=segs)
    want_g = jax.jit(jax.grad(loss), static_argnums=3)(params, tokens, segs, CFG)
    mesh = make_mesh(shape)
    p, t, s = _sharded_inputs(params, axes, tokens, segs, mesh)
    with jax.set_mesh(mesh):
        got = jax.jit(forward, static_argnames=("cfg", "shard"))(
            p, t, cfg, segment_ids=s, shard=LogicalSharding(mesh))
        got_g = jax.jit(jax.grad(loss), static_argnums=(3, 4))(p, t, s, cfg,
                                                               LogicalSharding(mesh))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=3e-5)
    _assert_grads_close(got_g, want_g)


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for x in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def _gathers(jaxpr, floats_only=True):
    """Gathers (of float arrays: permuted activations) outside shard_map bodies."""
    n = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        n += name == "gather" and (not floats_only
                                   or jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating))
        if name != "shard_map":
            n += sum(_gathers(j, floats_only) for j in _sub_jaxprs(eqn))
    return n


def test_layers_do_not_permute_activations(devices, model):
    """The ring order is applied at the model's input and output only: the layer scan's body
    gathers nothing (no activation, and no segment ids: they stay in the original order), while
    attention called without the order permutes q, k, v and out."""
    params, _, tokens, segs = model
    mesh = make_mesh((2, 1, 1, 4))
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda p, t, s: forward(p, t, RING, segment_ids=s))(
            params, tokens, segs).jaxpr
        layer = next(e for e in jaxpr.eqns if e.primitive.name == "scan").params["jaxpr"].jaxpr
        assert _gathers(layer, floats_only=False) == 0
        assert _gathers(jaxpr) == 2  # the embedding lookup; the logits back to order
        q = jnp.zeros((2, 48, CFG.num_heads, CFG.head_dim))
        per_call = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, Causal(), impl="ring"))(
            q, q[:, :, :2], q[:, :, :2]).jaxpr
    assert _gathers(per_call) == 4  # q, k, v into the ring order, the output back


def test_load_balance_field_is_checked():
    with pytest.raises(ValueError, match="load_balance='mask_aware'.*expected one of"):
        AttentionConfig(impl="ring", load_balance="mask_aware")
    with pytest.raises(ValueError, match="read only by impl 'ring' or 'allgather'"):
        AttentionConfig(impl="xla", load_balance="striped")


def test_training_gradients_with_data_fsdp_tensor_context(devices, model):
    """A training step's gradients on a 1x2x2x2 (data, fsdp, tensor, context) mesh."""
    params, axes, tokens, segs = model
    want = jax.jit(jax.grad(loss), static_argnums=3)(params, tokens, segs, CFG)
    mesh = make_mesh((1, 2, 2, 2))
    p, t, s = _sharded_inputs(params, axes, tokens, segs, mesh)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss), static_argnums=(3, 4))(p, t, s, RING, LogicalSharding(mesh))
    _assert_grads_close(got, want)


def test_ring_without_a_mesh_names_the_fix(model):
    params, _, tokens, segs = model
    with pytest.raises(ValueError, match="axis_name='context' is not an axis of the mesh"):
        forward(params, tokens, RING, segment_ids=segs)


def test_ring_pallas_model_matches_unsharded(devices, model):
    """AttentionConfig(impl="ring_pallas") reaches the fused Pallas ring kernels from the
    decoder (interpreted on the CPU devices): forward equals the unsharded one (causal, no
    documents: the kernel takes index masks)."""
    params, axes, _, _ = model
    tokens = jax.random.randint(jax.random.key(2), (1, 64), 0, CFG.vocab_size)
    cfg = dataclasses.replace(CFG, attention=AttentionConfig(impl="ring_pallas", block_q=8,
                                                             block_k=8))
    want = jax.jit(forward, static_argnames="cfg")(params, tokens, CFG)
    mesh = make_mesh((1, 1, 1, 4), devices=devices[:4])
    with jax.set_mesh(mesh):
        got = jax.jit(forward, static_argnames=("cfg", "shard"))(
            shard_params(params, axes, mesh), tokens, cfg, shard=LogicalSharding(mesh))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=3e-5)


def test_model_on_a_jax_make_mesh_mesh(devices, model):
    """A mesh from jax.make_mesh (Explicit axes): shard_params and LogicalSharding convert it,
    under jax.set_mesh(auto_mesh(mesh)) the ring model equals the unsharded one, and setting
    the Explicit mesh itself is refused with the way out."""
    from lcm.sharding import auto_mesh
    params, axes, tokens, segs = model
    mesh = jax.make_mesh((2, 1, 1, 4), ("data", "fsdp", "tensor", "context"))
    want = jax.jit(forward, static_argnames="cfg")(params, tokens, CFG, segment_ids=segs)
    run = jax.jit(forward, static_argnames=("cfg", "shard"))
    p, t, s = _sharded_inputs(params, axes, tokens, segs, mesh)
    with jax.set_mesh(auto_mesh(mesh)), pytest.raises(ValueError, match=r"tokens is placed on "
                                                      r"a mesh with Explicit axes .*auto_mesh"):
        run(p, t, RING, segment_ids=s, shard=LogicalSharding(mesh))
    p, t, s = _sharded_inputs(params, axes, tokens, segs, auto_mesh(mesh))
    with jax.set_mesh(auto_mesh(mesh)):
        got = run(p, t, RING, segment_ids=s, shard=LogicalSharding(mesh))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=3e-5)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"set by jax.set_mesh has "
                                                             r"Explicit axes .*auto_mesh"):
        run(p, t, RING, segment_ids=s, shard=LogicalSharding(mesh))
