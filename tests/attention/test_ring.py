"""Ring and all-gather context parallelism against the dense reference: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm.attention import (BlockMask, Causal, Chunked, Document, Local, MaskFn, PrefixLM,
                           SinkWindow, VerticalSlash, attend, make_ring_order, ring_attention)
from lcm.sharding import make_mesh

TOL = {jnp.float32: 3e-5, jnp.bfloat16: 3e-2}
MASKS = ["none", "causal", "local", "sinkwindow", "causal&document", "local|document",
         "chunked", "prefixlm", "blockmask", "blockmask_runtime&causal", "verticalslash",
         "maskfn_head_batch&causal"]


def head_batch_window(b, h, q, k):
    """A MaskFn predicate reading batch and head: a window of 5 + 3 * h + 7 * b keys."""
    return q - k < 5 + 3 * h + 7 * b


def ring_mesh(devices, P):
    return make_mesh((1, 1, 1, P), devices=devices[:P])


def segments(B, L, num, seed):
    """Segment ids [B, L] with `num` random boundaries per row (documents cross shards)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(1, L, (B, num)), axis=1)
    return jnp.asarray((np.arange(L)[None, None] >= cuts[:, :, None]).sum(1), jnp.int32)


def build_mask(kind, L, H, window, seed=0):
    rng = np.random.default_rng(seed)
    doc = Document(segments(2, L, 2, seed))
    bs = 8
    grid = rng.random((H, -(-L // bs), -(-L // bs))) < 0.5
    return {"none": None, "causal": Causal(), "local": Local(window),
            "sinkwindow": SinkWindow(3, window), "causal&document": Causal() & doc,
            "local|document": Local(window) | doc, "chunked": Chunked(window),
            "prefixlm": PrefixLM(window), "blockmask": BlockMask(grid[0], bs),
            "blockmask_runtime&causal": BlockMask(jnp.asarray(grid), bs) & Causal(),
            "verticalslash": VerticalSlash(jnp.asarray(rng.integers(0, L, (H, 3)), jnp.int32),
                                           jnp.asarray(rng.integers(0, L, (1, 4)), jnp.int32)),
            "maskfn_head_batch&causal": MaskFn(head_batch_window) & Causal(),
            }[kind]


def check(q, k, v, mask, tol, *, grads=True, softcap=None, sinks=None, **kw):
    """ring_attention's output and VJP (one jit) vs the reference's, for a random cotangent;
    with sinks, their gradient too."""
    do = jax.random.normal(jax.random.key(7), q.shape, jnp.float32).astype(q.dtype)
    args = (q, k, v) if sinks is None else (q, k, v, sinks)

    def run(fn):
        def f(*args):
            out, vjp = jax.vjp(fn, *args)
            return out, (vjp(do) if grads else ())
        return f

    def sinks_of(rest):
        return rest[0] if rest else None

    got, g_got = jax.jit(run(lambda q, k, v, *s: ring_attention(
        q, k, v, mask, softcap=softcap, sinks=sinks_of(s), **kw)))(*args)
    want, g_want = run(lambda q, k, v, *s: attend(q, k, v, mask, impl="reference",
                                                  softcap=softcap, sinks=sinks_of(s)))(*args)
    assert not np.isnan(np.asarray(got, np.float32)).any()
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)
    for name, a, b in zip(["q", "k", "v", "sinks"], g_got, g_want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(1.0, np.abs(b).max())
        np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol, err_msg=f"d{name}")
    return got, g_got


@pytest.mark.parametrize("P,load_balance,kind,L,H,K", [
    (4, "zigzag", "causal", 100, 4, 2),          # GQA, length needs padding
    (2, "none", "causal&document", 64, 2, 1),   # MQA, documents crossing the shard boundary
    (8, "striped", "local", 128, 2, 2),
    (4, "mask_aware", "sinkwindow", 96, 2, 1),
])
def test_ring_matches_reference(devices, P, load_balance, kind, L, H, K):
    q, k, v = random_qkv(jax.random.key(L), 2, L, L, H, K, 8, jnp.float32)
    mask = build_mask(kind, L, H, window=20)
    check(q, k, v, mask, TOL[jnp.float32], mesh=ring_mesh(devices, P),
          load_balance=load_balance, block_q=8, block_k=8)


def test_allgather_matches_reference(devices):
    q, k, v = random_qkv(jax.random.key(3), 2, 72, 72, 4, 2, 8, jnp.float32)
    mask = Causal() & Document(segments(2, 72, 3, 1))
    check(q, k, v, mask, TOL[jnp.float32], mesh=ring_mesh(devices, 4), load_balance="zigzag",
          block_q=8, block_k=8, strategy="allgather")


def random_sinks(H, seed, spread=3.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(H) * spread, jnp.float32)


@pytest.mark.parametrize("strategy,mesh_shape,load_balance,kind,L", [
    ("ring", (1, 1, 1, 4), "zigzag", "causal", 100),            # padded ring order
    ("ring", (2, 1, 2, 2), "none", "causal&document", 64),      # batch and heads sharded too
    ("allgather", (1, 1, 1, 4), "striped", "local", 64),
    ("allgather", (2, 1, 2, 2), "zigzag", "blockmask_runtime&causal", 48),
])
def test_ring_sinks_match_reference(devices, strategy, mesh_shape, load_balance, kind, L):
    """Sink logits under context parallelism: each row counts its sink once however many
    shards its keys span (values), and d sinks sums every device's rows (heads split over the
    tensor axis on the (2, 1, 2, 2) meshes)."""
    H, K = 4, 2
    q, k, v = random_qkv(jax.random.key(L), 2, L, L, H, K, 8, jnp.float32)
    mesh = make_mesh(mesh_shape, devices=devices[:int(np.prod(mesh_shape))])
    check(q, k, v, build_mask(kind, L, H, window=20), TOL[jnp.float32], mesh=mesh,
          load_balance=load_balance, block_q=8, block_k=8, strategy=strategy,
          sinks=random_sinks(H, L))


def test_ring_masks_values(devices):
    """Array masks (the layout is made on each device), forward only; the random-case sweep
    (slow) covers every kind with gradients."""
    mesh = ring_mesh(devices, 4)
    L, H = 64, 2
    q, k, v = random_qkv(jax.random.key(5), 2, L, L, H, 1, 8, jnp.float32)
    for kind in ["blockmask_runtime&causal", "verticalslash"]:
        check(q, k, v, build_mask(kind, L, H, window=12), TOL[jnp.float32], grads=False,
              mesh=mesh, load_balance="zigzag", block_q=8, block_k=8)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_fully_masked_rows_are_zero_with_finite_grads(devices, with_sinks):
    L = 32
    grid = np.ones((4, 4), bool)
    grid[1] = False  # query rows 8..15 see nothing
    q, k, v = random_qkv(jax.random.key(1), 1, L, L, 2, 2, 8, jnp.float32)
    out, (dq, *_) = check(q, k, v, BlockMask(grid, 8), 3e-5, mesh=ring_mesh(devices, 2),
                          load_balance="zigzag", block_q=8, block_k=8,
                          sinks=random_sinks(2, 1) if with_sinks else None)
    assert np.all(np.asarray(out[:, 8:16]) == 0) and np.all(np.asarray(dq[:, 8:16]) == 0)


@pytest.mark.slow
def test_ring_bfloat16_and_softcap(devices):
    q, k, v = random_qkv(jax.random.key(2), 1, 64, 64, 4, 2, 16, jnp.bfloat16)
    check(q, k, v, Causal(), TOL[jnp.bfloat16], softcap=5.0, mesh=ring_mesh(devices, 4),
          load_balance="zigzag", block_q=8, block_k=8)


def test_ring_order_inputs_stay_in_ring_order(devices):
    """With a RingOrder, q, k, v are in ring order, and so is the output; Document ids stay in
    the original order (ids passed through to_ring are refused, naming the expected shape)."""
    P, L = 4, 60
    mesh = ring_mesh(devices, P)
    order = make_ring_order(L, P, "zigzag", block=8)
    q, k, v = random_qkv(jax.random.key(4), 2, L, L, 2, 2, 8, jnp.float32)
    seg = segments(2, L, 2, 3)
    want = attend(q, k, v, Causal() & Document(seg), impl="reference")

    def ring(q, k, v, seg):
        return attend(q, k, v, Causal() & Document(seg), impl="ring", mesh=mesh,
                      load_balance=order, block_q=8, block_k=8)

    got = jax.jit(ring)(*(order.to_ring(x) for x in (q, k, v)), seg)
    np.testing.assert_allclose(np.asarray(order.from_ring(got)), np.asarray(want), atol=3e-5)
    with pytest.raises(ValueError, match=r"original order, \[batch, 60\]"):
        ring(*(order.to_ring(x) for x in (q, k, v)), order.to_ring(seg, pad_value=-1))


def test_errors_name_axis_and_length(devices):
    mesh = ring_mesh(devices, 4)
    q, k, v = random_qkv(jax.random.key(0), 1, 32, 32, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="axis_name='seq' is not an axis"):
        ring_attention(q, k, v, mesh=mesh, axis_name="seq")
    with pytest.raises(ValueError, match="load_balance='spiral'"):
        ring_attention(q, k, v, mesh=mesh, load_balance="spiral")
    with pytest.raises(ValueError, match="q_len=16 != kv_len=32"):
        ring_attention(q[:, :16], k, v, mesh=mesh)
    order = make_ring_order(30, 4, "zigzag", block=8)
    with pytest.raises(ValueError, match=r"sequence length 32 .* mesh axis 'context'.* 64"):
        ring_attention(q, k, v, mesh=mesh, load_balance=order)
    with pytest.raises(ValueError, match="RingOrder over 2 devices; mesh axis 'context' has 4"):
        ring_attention(q, k, v, mesh=mesh, load_balance=make_ring_order(32, 2, "none"))
    with pytest.raises(ValueError, match="strategy='ulysses'"):
        ring_attention(q, k, v, mesh=mesh, strategy="ulysses")
    with pytest.raises(ValueError, match="k/v shape"):
        ring_attention(q, k[..., :4], v[..., :4], mesh=mesh)


def test_rules_table_places_batch_and_heads(devices):
    """The shard_map specs come from lcm.sharding.logical_to_spec over the rules table: the
    default splits batch over data and KV heads over tensor; a table without them replicates
    both, with the same result; a rules value that is not a mapping is refused."""
    from jax.sharding import PartitionSpec

    from lcm.attention.ring.specs import shard_specs
    from lcm.sharding import DEFAULT_RULES

    mesh = make_mesh((2, 1, 2, 2), devices=devices)
    q, k, v = random_qkv(jax.random.key(6), 2, 32, 32, 4, 2, 8, jnp.float32)
    order = make_ring_order(32, 2, "zigzag", block=8)
    assert shard_specs(mesh, "context", q, k, Causal(), order)[0] == PartitionSpec(
        "data", "context", "tensor", None)
    whole = {**DEFAULT_RULES, "batch": None, "kv_heads": None}
    assert shard_specs(mesh, "context", q, k, Causal(), order, whole)[0] == PartitionSpec(
        None, "context", None, None)
    want = attend(q, k, v, Causal(), impl="reference")
    for rules in (DEFAULT_RULES, whole):
        got = jax.jit(lambda q, k, v: ring_attention(q, k, v, Causal(), mesh=mesh, rules=rules,
                                                     block_q=8, block_k=8))(q, k, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=3e-5)
    with pytest.raises(ValueError, match="rules=.*expected a mapping"):
        ring_attention(q, k, v, mesh=mesh, rules=["batch"])
    with pytest.raises(ValueError, match="logical axis 'kv_heads' has no rule"):
        ring_attention(q, k, v, mesh=mesh, rules={"batch": "data"})


def test_ring_order_helpers():
    order = make_ring_order(50, 4, "zigzag", block=8)
    assert order.chunks == ((0, 7), (1, 6), (2, 5), (3, 4)) and order.chunk_size == 8
    assert order.padded_length == 64 and order.shard_length == 16
    x = jnp.arange(2 * 50).reshape(2, 50)
    ring = order.to_ring(x, pad_value=-1)
    # Device 0 holds chunk 0 (tokens 0..7) and chunk 7 (56..63: all padding).
    np.testing.assert_array_equal(np.asarray(ring[0, :16]), np.r_[np.arange(8), np.full(8, -1)])
    np.testing.assert_array_equal(np.asarray(order.from_ring(ring)), np.asarray(x))
    positions = order.positions()
    np.testing.assert_array_equal(np.sort(positions), np.arange(64))
    assert make_ring_order(64, 4, "striped", block=8).chunks == ((0, 4), (1, 5), (2, 6), (3, 7))
    with pytest.raises(ValueError, match="load_balance='spiral'"):
        make_ring_order(64, 4, "spiral")
    with pytest.raises(ValueError, match="no axis 1 of length 50"):
        order.to_ring(jnp.zeros((2, 49)))


def test_load_balance_evens_out_ring_steps():
    """The slowest device per ring step: zigzag fixes causal; mask_aware fixes sliding windows."""
    from lcm.attention.ring.order import chunk_work, ring_cost

    L, P = 1024, 4

    causal_none = make_ring_order(L, P, "none", block=32)
    causal_zig = make_ring_order(L, P, "zigzag", block=32)
    w = chunk_work(Causal(), L, L, 128)  # 8 chunks of 128 = zigzag's chunks
    contiguous = tuple(tuple(2 * d + i for i in range(2)) for d in range(P))
    assert ring_cost(w, causal_zig.chunks) < 0.7 * ring_cost(w, contiguous)
    assert causal_none.chunks == ((0,), (1,), (2,), (3,))
    mask = SinkWindow(16, 200)
    aware = make_ring_order(L, P, "mask_aware", block=32, mask=mask, num_chunks=16)
    w = chunk_work(mask, L, L, aware.chunk_size)
    snake = tuple(tuple(c) for c in np.asarray(
        [list(range(r * P, (r + 1) * P))[:: 1 if r % 2 == 0 else -1] for r in range(4)]).T)
    assert ring_cost(w, aware.chunks) < ring_cost(w, snake)


def test_plan_skips_ring_steps_no_device_needs():
    from lcm.attention.ring.layout import make_plan

    order = make_ring_order(256, 8, "none", block=8)
    assert make_plan(Local(20), order, 8, 8).num_steps == 2  # a window reaches one shard back
    assert make_plan(Causal(), order, 8, 8).num_steps == 8
    assert make_plan(None, order, 8, 8).max_visits == 4


@st.composite
def cases(draw):
    P = draw(st.sampled_from([2, 4, 8]))
    L = draw(st.integers(P, 120))
    K = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(MASKS))
    lb = draw(st.sampled_from(["none", "zigzag", "striped", "mask_aware"]))
    block = draw(st.sampled_from([8, 16]))
    window = draw(st.integers(1, 40))
    sinks = draw(st.sampled_from([None, 1.0, 4.0]))  # sink logits' spread, or no sinks
    return P, L, K, G, kind, lb, block, window, sinks, draw(st.integers(0, 2**16))


@pytest.mark.slow
@settings(max_examples=10)  # each case compiles a shard_map program: keep the suite short
@given(cases())
def test_ring_random_cases(devices, case):
    P, L, K, G, kind, lb, block, window, spread, seed = case
    H = K * G
    mask = build_mask(kind, L, H, window, seed)
    if lb == "mask_aware" and mask is not None and not mask.is_static:
        lb = "zigzag"  # mask_aware takes concrete masks; tested with static ones here
    q, k, v = random_qkv(jax.random.key(seed), 2, L, L, H, K, 8, jnp.float32)
    sinks = None if spread is None else random_sinks(H, seed, spread)
    check(q, k, v, mask, TOL[jnp.float32], mesh=ring_mesh(devices, P), load_balance=lb,
          block_q=block, block_k=block, sinks=sinks)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_blocked_steps_carry_statistics_across_key_ranges(softcap):
    """The pre-blocked entry ring steps use: keys in two ranges, float32 statistics carried
    across two calls, equal one dense pass; each range's backward with the merged lse sums to
    the reference gradient (FULL, PARTIAL and skipped blocks; documents; GQA)."""
    from lcm.kernels.block_sparse.layout import layout_from_kinds
    from lcm.attention import blocked as bw
    from lcm.attention.layout import BlockLayout, mask_layout
    from lcm.attention.masks import BlockGeometry
    from lcm.attention.ring.layout import PlacedMask

    B, L, H, K, D, bq, bk = 2, 32, 4, 2, 8, 8, 8
    half = L // 2
    q, k, v = random_qkv(jax.random.key(3), B, L, L, H, K, D, jnp.float32)
    do = jax.random.normal(jax.random.key(4), q.shape)
    mask = (Causal() & Document(segments(B, L, 2, 5))).prepare(L, L)
    kinds = mask_layout(mask, L, L, bq, bk).kinds  # [1, nq, nk]
    geom = BlockGeometry(L, half, bq, bk)
    ranges = []
    for start in (0, half):
        part = kinds[..., start // bk:(start + half) // bk]
        kv_blocks, counts = layout_from_kinds(part, part.shape[-1])
        layout = BlockLayout(kinds=part, kv_blocks=kv_blocks, counts=counts, geom=geom,
                             max_visits=part.shape[-1])
        placed = PlacedMask(mask, jnp.arange(L), start + jnp.arange(half), L)
        ranges.append((bw.to_blocks(k[:, start:start + half], bk),
                       bw.to_blocks(v[:, start:start + half], bk), placed, layout))
    qb, dob = bw.to_blocks(q, bq, K), bw.to_blocks(do, bq, K)
    kw = dict(scale=D ** -0.5, softcap=softcap)

    @jax.jit
    def run(qb, dob):
        stats = bw.blocked_init(qb)
        for kb, vb, placed, layout in ranges:
            stats = bw.blocked_forward_step(qb, kb, vb, placed, layout, stats, **kw)
        out, lse = bw.blocked_finish(stats, qb.dtype)
        delta = bw.blocked_delta(out, dob)
        grads = []
        for kb, vb, placed, layout in ranges:
            acc = (jnp.zeros(qb.shape), jnp.zeros(kb.shape), jnp.zeros(vb.shape))
            grads.append(bw.blocked_backward_step(qb, kb, vb, dob, lse, delta, placed, layout,
                                                  acc, **kw))
        dq = grads[0][0] + grads[1][0]
        dk = jnp.concatenate([bw.from_blocks(g[1]) for g in grads], 1)
        dv = jnp.concatenate([bw.from_blocks(g[2]) for g in grads], 1)
        return bw.from_blocks(out), (bw.from_blocks(dq), dk, dv)

    got, g_got = run(qb, dob)
    want, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask, impl="reference", softcap=softcap),
                        q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    for name, a, b in zip("qkv", g_got, vjp(do)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5,
                                   err_msg=f"d{name}")


def test_attend_ring_pallas_matches_reference(devices):
    """attend(impl="ring_pallas"): the fused Pallas ring kernels (interpreted) over the 8 CPU
    devices, values and gradients against the dense reference."""
    mesh = ring_mesh(devices, 8)
    q, k, v = random_qkv(jax.random.key(0), 1, 128, 128, 2, 1, 8, jnp.float32)
    do = jax.random.normal(jax.random.key(1), q.shape)

    def loss(impl, **kw):
        return lambda q, k, v: jnp.sum(attend(q, k, v, Causal(), impl=impl, **kw) * do)

    got = jax.jit(jax.value_and_grad(loss("ring_pallas", mesh=mesh, block_q=8, block_k=8),
                                     argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("load_balance", ["zigzag", "none"])
def test_attend_ring_pallas_sinks_match_reference(devices, load_balance):
    """impl="ring_pallas" with sink logits, merged once per row after the kernel's ring: values
    and gradients (d sinks included) against the dense reference, for both kernel orders."""
    mesh = ring_mesh(devices, 8)
    H = 2
    q, k, v = random_qkv(jax.random.key(2), 1, 128, 128, H, 1, 8, jnp.float32)
    do = jax.random.normal(jax.random.key(3), q.shape)
    sinks = random_sinks(H, 2)

    def loss(impl, **kw):
        return lambda q, k, v, s: jnp.sum(attend(q, k, v, Causal(), impl=impl, sinks=s, **kw)
                                          * do)

    got = jax.jit(jax.value_and_grad(loss("ring_pallas", mesh=mesh, block_q=8, block_k=8,
                                          load_balance=load_balance),
                                     argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    want = jax.value_and_grad(loss("reference"), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_attend_context_parallel_options_are_checked(devices):
    """Bad impl names and options of the context-parallel impls raise before tracing, naming
    the argument and the choices."""
    from lcm.attention import IMPLS

    mesh = ring_mesh(devices, 4)
    q, k, v = random_qkv(jax.random.key(0), 1, 64, 64, 2, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match=r"impl='ring_palas'; expected one of .*'ring_pallas'"):
        attend(q, k, v, Causal(), impl="ring_palas", mesh=mesh)
    assert {"ring", "allgather", "ring_pallas"} <= set(IMPLS)
    with pytest.raises(ValueError, match="not Document; use strategy='ring'"):
        attend(q, k, v, Document(jnp.zeros((1, 64), jnp.int32)), impl="ring_pallas", mesh=mesh)
    with pytest.raises(ValueError, match="softcap with strategy='pallas' \\(impl='ring_pallas'\\)"):
        attend(q, k, v, Causal(), impl="ring_pallas", mesh=mesh, softcap=5.0)
    with pytest.raises(ValueError, match="load_balance 'none' or 'zigzag'"):
        attend(q, k, v, Causal(), impl="ring_pallas", mesh=mesh, load_balance="striped")
    with pytest.raises(ValueError, match="alibi_slopes with impl='ring_pallas'"):
        attend(q, k, v, Causal(), impl="ring_pallas", mesh=mesh, alibi_slopes=np.ones(2))
    with pytest.raises(ValueError, match=r"rules=\['batch'\]; expected a mapping"):
        attend(q, k, v, Causal(), impl="ring", mesh=mesh, rules=["batch"])
    for name in ("mesh", "rules"):
        with pytest.raises(ValueError, match=f"{name}= is for impl in .*'ring_pallas'.*'xla'"):
            attend(q, k, v, Causal(), impl="xla", **{name: {"mesh": mesh, "rules": {}}[name]})


@pytest.mark.parametrize("impl,how", [("ring", "mesh="), ("allgather", "set_mesh"),
                                      ("ring", "set_mesh+sharded")])
def test_meshes_from_jax_make_mesh_with_explicit_axes(devices, impl, how):
    """jax.make_mesh gives Explicit axis types by default: passed as mesh=, set with
    jax.set_mesh, and with inputs placed on its explicit shardings, the context-parallel paths
    equal the reference in values and gradients, eagerly and under jit."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Spec
    mesh = jax.make_mesh((2, 4), ("data", "context"))
    assert jax.sharding.AxisType.Explicit in mesh.axis_types
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (2, 44, 4, 8), jnp.float32)
    k, v = (jax.random.normal(key, (2, 44, 2, 8), jnp.float32) for key in (kk, kv))
    mask = Local(13)
    want = attend(q, k, v, mask, impl="reference")
    want_g = jax.grad(lambda q, k: jnp.sum(attend(q, k, v, mask, impl="reference") ** 2),
                      argnums=(0, 1))(q, k)

    def run(q, k):
        kwargs = {"mesh": mesh} if how == "mesh=" else {}
        return attend(q, k, v, mask, impl=impl, block_q=8, block_k=8, **kwargs)

    def check(q, k):
        got = run(q, k)
        got_jit = jax.jit(run)(q, k)
        got_g = jax.jit(jax.grad(lambda q, k: jnp.sum(run(q, k) ** 2), argnums=(0, 1)))(q, k)
        for out in (got, got_jit):
            np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-6)
        for g, w in zip(got_g, want_g):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)

    if how == "mesh=":
        check(q, k)
        return
    with jax.set_mesh(mesh):
        if how == "set_mesh+sharded":
            spec = NamedSharding(mesh, Spec("data", "context"))
            q, k = jax.device_put(q, spec), jax.device_put(k, spec)
        check(q, k)
