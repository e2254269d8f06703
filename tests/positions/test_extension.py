"""Self-Extend, ReRoPE, leaky ReRoPE, ALiBi, NoPE: against NumPy definitions on a tiny model."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.attention import Causal, Local
from lcm.attention.masks import BlockGeometry
from lcm.config import AttentionConfig, ModelConfig, PositionConfig
from lcm.model import forward, init_params
from lcm.positions import FarCausal, alibi_slopes, merged_attention, rope_frequencies

CFG = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
fwd = jax.jit(forward, static_argnames=("cfg", "shard"))


# ------------------------------------------------------------------------ NumPy definitions


def np_rotate(x, angle_pos, inv_freq):
    """Rotate-half RoPE of x [..., D] by (possibly fractional) positions angle_pos [...]."""
    ang = angle_pos[..., None] * inv_freq
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def relative_position(kind, i, j, pc):
    """The paper's effective relative position of query i and key j (distance d = i - j)."""
    d = i - j
    w = pc.window
    if kind == "rope" or d < w:
        return float(d)
    if kind == "self_extend":
        g = pc.group_size
        return i // g + w - w / g - j // g
    if kind == "rerope":
        return float(w)
    return w + (d - w) / pc.leak  # leaky_rerope


def np_attention(q, k, v, pc, inv_freq, window=None):
    """Dense definition. q [T, H, D], k, v [T, K, D] (unrotated, float64) -> [T, H, D].

    RoPE scores as q_i . R(rel(i, j)) k_j: the relative-position form, not the two-pass trick.
    """
    T, H, D = q.shape
    K = k.shape[1]
    kind = pc.type
    if pc.log_scale_length is not None:
        q = q * np.maximum(np.log(np.arange(T) + 1.0) / math.log(pc.log_scale_length),
                           1.0)[:, None, None]
    out = np.zeros_like(q)
    slopes = alibi_slopes(H).astype(np.float64)
    for h in range(H):
        kh = h // (H // K)
        s = np.full((T, T), -np.inf)
        for i in range(T):
            for j in range(i + 1):
                if window is not None and i - j >= window:
                    continue
                if kind in ("nope", "alibi"):
                    s[i, j] = q[i, h] @ k[j, kh]
                else:
                    rel = relative_position(kind, i, j, pc)
                    # q_i . R(rel) k_j == rot(q_i, rel) . rot(k_j, 0): rotate k by -rel.
                    s[i, j] = q[i, h] @ np_rotate(k[j, kh], np.float64(-rel), inv_freq)
        s = s / math.sqrt(D)
        if kind == "alibi":
            s = s - slopes[h] * (np.arange(T)[:, None] - np.arange(T)[None, :])
        p = np.exp(s - s.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        out[:, h] = p @ v[:, kh]
    return out


def np_rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def np_forward(params, tokens, cfg):
    """The tiny decoder in float64 NumPy, one sequence: tokens [T] -> logits [T, V]."""
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    inv_freq = np.asarray(rope_frequencies(cfg.rope, cfg.head_dim)[0], np.float64)
    x = P["embed"][tokens]
    for layer in range(cfg.num_layers):
        p = {name: a[layer] for name, a in P["layers"].items()}
        h = np_rms(x, p["attn_norm"], cfg.norm_eps)
        q = np.einsum("te,ehd->thd", h, p["wq"])
        k = np.einsum("te,ehd->thd", h, p["wk"])
        v = np.einsum("te,ehd->thd", h, p["wv"])
        o = np_attention(q, k, v, cfg.positions, inv_freq, cfg.sliding_window)
        x = x + np.einsum("thd,hde->te", o, p["wo"])
        h = np_rms(x, p["mlp_norm"], cfg.norm_eps)
        gate, up = h @ p["w_gate"], h @ p["w_up"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p["w_down"]
    x = np_rms(x, P["final_norm"], cfg.norm_eps)
    return x @ P["lm_head"]


# ------------------------------------------------------------------------ model vs definition

POSITIONS = {
    "rope": PositionConfig(),
    "nope": PositionConfig(type="nope"),
    "alibi": PositionConfig(type="alibi"),
    "self_extend": PositionConfig(type="self_extend", window=6, group_size=3),
    "self_extend_frac": PositionConfig(type="self_extend", window=5, group_size=3),
    "rerope": PositionConfig(type="rerope", window=5),
    "rerope_log": PositionConfig(type="rerope", window=5, log_scale_length=8),
    "leaky_rerope": PositionConfig(type="leaky_rerope", window=4, leak=4.0,
                                   log_scale_length=6),
}


CASES = [(name, "xla") for name in POSITIONS] + [
    ("self_extend_frac", "reference"), ("leaky_rerope", "reference"), ("alibi", "reference"),
    pytest.param("alibi", "pallas", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,impl", CASES)
def test_tiny_model_logits_match_numpy_definition(name, impl):
    cfg = dataclasses.replace(CFG, positions=POSITIONS[name],
                              attention=dataclasses.replace(CFG.attention, impl=impl))
    params, _ = init_params(cfg, jax.random.key(3))
    tokens = jax.random.randint(jax.random.key(4), (2, 21), 0, cfg.vocab_size, jnp.int32)
    got = np.asarray(fwd(params, tokens, cfg))
    for b in range(2):
        want = np_forward(params, np.asarray(tokens[b]), cfg)
        np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=1e-4)


def test_self_extend_with_sliding_window_matches_numpy():
    cfg = dataclasses.replace(CFG, sliding_window=9, positions=POSITIONS["self_extend"])
    params, _ = init_params(cfg, jax.random.key(5))
    tokens = jax.random.randint(jax.random.key(6), (1, 19), 0, cfg.vocab_size, jnp.int32)
    np.testing.assert_allclose(np.asarray(fwd(params, tokens, cfg))[0],
                               np_forward(params, np.asarray(tokens[0]), cfg),
                               atol=1e-4, rtol=1e-4)


def test_one_replace_switches_a_model_and_wide_windows_change_nothing():
    params, _ = init_params(CFG, jax.random.key(7))
    tokens = jax.random.randint(jax.random.key(8), (2, 16), 0, CFG.vocab_size, jnp.int32)
    base = np.asarray(fwd(params, tokens, CFG))
    wide = PositionConfig(type="self_extend", window=16, group_size=4)
    same = fwd(params, tokens, dataclasses.replace(CFG, positions=wide))
    np.testing.assert_allclose(np.asarray(same), base, atol=2e-5, rtol=2e-5)
    other = fwd(params, tokens, dataclasses.replace(
        CFG, positions=PositionConfig(type="self_extend", window=4, group_size=2)))
    assert np.abs(np.asarray(other) - base).max() > 1e-3


def test_packed_segments_follow_the_definition_per_segment():
    cfg = dataclasses.replace(CFG, positions=POSITIONS["self_extend"])
    params, _ = init_params(cfg, jax.random.key(9))
    tokens = jax.random.randint(jax.random.key(10), (1, 20), 0, cfg.vocab_size, jnp.int32)
    segment_ids = jnp.asarray([[0] * 13 + [1] * 7], jnp.int32)
    got = np.asarray(fwd(params, tokens, cfg, segment_ids=segment_ids))[0]
    np.testing.assert_allclose(got[:13], np_forward(params, np.asarray(tokens[0, :13]), cfg),
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[13:], np_forward(params, np.asarray(tokens[0, 13:]), cfg),
                               atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------ two-pass merge


def random_pairs(key, B=2, T=19, H=4, K=2, D=8):
    ks = jax.random.split(key, 5)
    q1, q2 = (jax.random.normal(k, (B, T, H, D)) for k in ks[:2])
    k1, k2, v = (jax.random.normal(k, (B, T, K, D)) for k in ks[2:])
    return q1, k1, q2, k2, v


def dense_definition(q1, k1, q2, k2, v, window):
    """jnp: scores q1.k1 at distance < window, q2.k2 beyond; one causal softmax."""
    T, D = q1.shape[1], q1.shape[-1]
    G = q1.shape[2] // k1.shape[2]
    s1 = jnp.einsum("bthd,bshd->bhts", q1, jnp.repeat(k1, G, axis=2))
    s2 = jnp.einsum("bthd,bshd->bhts", q2, jnp.repeat(k2, G, axis=2))
    d = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    s = jnp.where((d < window)[None, None], s1, s2) / math.sqrt(D)
    s = jnp.where((d >= 0)[None, None], s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), jnp.repeat(v, G, axis=2))


@pytest.mark.parametrize("window,block,impl", [(5, 8, "xla"), (30, 4, "xla"), (5, 8, "pallas"),
                                               (12, 8, "pallas")])
def test_merged_attention_and_grads_match_dense_definition(window, block, impl):
    args = random_pairs(jax.random.key(window))
    near, far = Causal() & Local(window), Causal() & FarCausal(window)
    cot = jax.random.normal(jax.random.key(99), args[0].shape)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * cot)

    two_pass = jax.jit(lambda *a: merged_attention(*a, near, far, impl=impl, block_q=block,
                                                   block_k=block))
    want = dense_definition(*args, window)
    np.testing.assert_allclose(two_pass(*args), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(merged_attention(*args, near, far, impl="reference"), want,
                               atol=1e-5, rtol=1e-5)
    got_g = jax.grad(loss(two_pass), argnums=range(5))(*args)
    want_g = jax.grad(loss(lambda *a: dense_definition(*a, window)), argnums=range(5))(*args)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,impl", [
    ("self_extend_frac", "xla"), pytest.param("alibi", "pallas", marks=pytest.mark.slow)])
def test_position_model_grads_match_reference_backend(name, impl):
    cfg = dataclasses.replace(CFG, positions=POSITIONS[name],
                              attention=dataclasses.replace(CFG.attention, impl=impl))
    ref = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention,
                                                                 impl="reference"))
    params, _ = init_params(cfg, jax.random.key(11))
    tokens = jax.random.randint(jax.random.key(12), (2, 18), 0, cfg.vocab_size, jnp.int32)

    def loss(p, c):
        return jnp.mean(jax.nn.log_softmax(forward(p, tokens, c))[..., 0])

    got = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
    want = jax.jit(jax.grad(loss), static_argnums=1)(params, ref)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------ FarCausal layout


@pytest.mark.parametrize("q_len,kv_len,bq,bk,window", [
    (19, 19, 4, 4, 5), (32, 32, 8, 8, 8), (17, 33, 8, 4, 3), (7, 7, 8, 8, 1), (24, 24, 8, 8, 40)])
def test_far_causal_block_visibility_is_exact(q_len, kv_len, bq, bk, window):
    mask = FarCausal(window)
    geom = BlockGeometry(q_len, kv_len, bq, bk)
    any_, all_ = (np.asarray(x)[0, 0] for x in mask.block_visibility(geom))
    vis = np.asarray(mask.visible(np.arange(q_len), np.arange(kv_len), kv_len - q_len))[0, 0]
    for i in range(geom.num_q_blocks):
        for j in range(geom.num_k_blocks):
            blk = vis[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            assert any_[i, j] == blk.any() and all_[i, j] == blk.all(), (i, j)
    d = (np.arange(q_len)[:, None] + kv_len - q_len) - np.arange(kv_len)[None, :]
    np.testing.assert_array_equal(vis, d >= window)
    local = np.asarray(Local(window).visible(np.arange(q_len), np.arange(kv_len),
                                             kv_len - q_len))[0, 0]
    np.testing.assert_array_equal(vis | local, d >= 0)  # complementary within Causal
    assert not (vis & local).any()


# ------------------------------------------------------------------------ ALiBi, config


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0 ** -(2 * (i + 1)) for i in range(4)])
    six = [2.0 ** -(2 * (i + 1)) for i in range(4)] + [2.0 ** -1, 2.0 ** -3]
    np.testing.assert_allclose(alibi_slopes(6), six)


@pytest.mark.parametrize("kwargs,field", [
    (dict(type="yarn"), "type"),
    (dict(type="self_extend", window=4), "group_size"),
    (dict(type="self_extend", group_size=4), "window"),
    (dict(type="self_extend", window=0, group_size=2), "window"),
    (dict(type="rerope", window=4, group_size=2), "group_size"),
    (dict(type="rope", window=4), "window"),
    (dict(type="leaky_rerope", window=4), "leak"),
    (dict(type="leaky_rerope", window=4, leak=1.0), "leak"),
    (dict(type="rerope", window=4, log_scale_length=1), "log_scale_length"),
    (dict(type="alibi", leak=2.0), "leak"),
])
def test_bad_position_configs_raise(kwargs, field):
    with pytest.raises(ValueError, match=f"PositionConfig.{field}"):
        PositionConfig(**kwargs)


def test_model_config_checks_positions_type():
    with pytest.raises(ValueError, match="ModelConfig.positions"):
        dataclasses.replace(CFG, positions="self_extend")
