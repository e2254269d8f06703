"""Per-layer schedules and the features of Qwen3 / Gemma 2-3 / Phi-3 / Ministral / Llama 4 /
Qwen3-Next on every path: an independent NumPy decoder, every attention backend (values and
gradients), the scan over the schedule's pattern, the KV cache, memory and the ring."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import (Decoding, Knorm, SnapKV, StreamingLLM, decode_step, generate,
                       prefill)
from lcm.config import AttentionConfig, ModelConfig, RopeConfig
from lcm.memory import TransformerXL, run_segments
from lcm.model import forward, init_params, param_shapes, run_layers, schedule
from lcm.sharding import make_mesh

XLA = AttentionConfig(impl="xla", block_q=8, block_k=8)
# Gemma-3-shaped: 2 sliding layers per full one, a RoPE per layer type, qk-norm, soft-caps,
# query_pre_attn_scalar, sandwich norms, (1 + w) norms, GeGLU, embedding scale.
GEMMA = ModelConfig(
    vocab_size=61, hidden_size=32, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=48, layer_types=("sliding_attention", "sliding_attention",
                                       "full_attention", "sliding_attention",
                                       "sliding_attention"),
    sliding_window=4, rope=RopeConfig(theta=1e6, rope_type="linear", factor=2.0),
    sliding_rope=RopeConfig(theta=1e4), qk_norm="rms", attn_softcap=3.0, final_softcap=5.0,
    query_pre_attn_scalar=12.0, post_norms=True, norm_weight_offset=1.0,
    mlp_activation="gelu_tanh", embed_scale=True, tie_embeddings=True, attention=XLA)
# Llama-4 / Qwen3-Next / gpt-oss features: chunked and no-RoPE layers, L2 qk-norm, biases,
# output gate, sink logits.
MISC = ModelConfig(
    vocab_size=53, hidden_size=24, num_layers=4, num_heads=3, num_kv_heads=1, head_dim=8,
    intermediate_size=40, layer_types=("chunked_attention", "full_attention") * 2,
    attention_chunk_size=5, nope_layers=(1, 3), qk_norm="l2", qkv_bias=True, out_bias=True,
    attn_output_gate=True, attn_sinks=True,
    rope=RopeConfig(theta=500.0, partial_rotary_factor=0.5), attention=XLA)


def perturbed_params(cfg, seed=0):
    """init_params with norms and biases moved off their 0 / 1 starts, so each one counts."""
    params, _ = init_params(cfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))

    def move(path, x):
        name = path[-1].key
        if name.endswith("norm") or name in ("bq", "bk", "bv", "bo"):
            return x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype)
        if name == "sinks":
            return x + jax.random.normal(next(keys), x.shape, x.dtype)
        return x
    return jax.tree_util.tree_map_with_path(move, params)


def tokens_of(cfg, B, T, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


# ------------------------------------------------------------------ an independent reference

def numpy_forward(params, tokens, cfg):
    """The decoder written out in NumPy (float64), layer by layer, from the config's fields."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"][np.asarray(tokens)]
    B, T = tokens.shape
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cfg.embed_scale:
        x = x * np.float32(cfg.hidden_size ** 0.5)
    off = cfg.norm_weight_offset

    def norm(y, w):
        y = y / np.sqrt(np.mean(y * y, -1, keepdims=True) + cfg.norm_eps)
        return y if w is None else y * (off + w)

    def rope(y, r):
        if r is None:
            return y
        rot = int(D * r.partial_rotary_factor)
        inv = 1.0 / r.theta ** (np.arange(0, rot, 2) / rot)
        if r.rope_type == "linear":
            inv = inv / r.factor
        ang = np.arange(T)[:, None] * inv[None]
        cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        a, b = y[..., :rot // 2], y[..., rot // 2:rot]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin, y[..., rot:]], -1)

    qi, ki = np.arange(T)[:, None], np.arange(T)[None]
    for i, kind in enumerate(cfg.layer_kinds):
        lp = {k: v[i] for k, v in p["layers"].items()}
        h = norm(x, lp["attn_norm"])
        q = np.einsum("bte,ehd->bthd", h, lp["wq"]) + lp.get("bq", 0)
        k = np.einsum("bte,ehd->bthd", h, lp["wk"]) + lp.get("bk", 0)
        v = np.einsum("bte,ehd->bthd", h, lp["wv"]) + lp.get("bv", 0)
        if cfg.qk_norm:
            q, k = norm(q, lp.get("q_norm")), norm(k, lp.get("k_norm"))
        q, k = rope(q, kind.rope), rope(k, kind.rope)
        k, v = np.repeat(k, H // K, 2), np.repeat(v, H // K, 2)
        s = np.einsum("bthd,bshd->bhts", q, k) * (cfg.query_pre_attn_scalar or D) ** -0.5
        if cfg.attn_softcap:
            s = cfg.attn_softcap * np.tanh(s / cfg.attn_softcap)
        seen = ki <= qi
        if kind.window:
            seen &= ki > qi - kind.window
        if kind.chunk:
            seen &= ki // kind.chunk == qi // kind.chunk
        s = np.where(seen, s, -np.inf)
        sink = lp["sinks"][None, :, None, None] if cfg.attn_sinks else -np.inf
        m = np.maximum(s.max(-1, keepdims=True), sink)
        w = np.exp(s - m)
        total = w.sum(-1, keepdims=True) + np.exp(sink - m)  # the sink: a key with value 0
        out = np.einsum("bhts,bshd->bthd", w / total, v)
        if cfg.attn_output_gate:
            out = out / (1 + np.exp(-np.einsum("bte,ehd->bthd", h, lp["wg"])))
        y = np.einsum("bthd,hde->bte", out, lp["wo"]) + lp.get("bo", 0)
        x = x + (norm(y, lp["post_attn_norm"]) if cfg.post_norms else y)
        h = norm(x, lp["mlp_norm"])
        g = h @ lp["w_gate"]
        act = (g / (1 + np.exp(-g)) if cfg.mlp_activation == "silu" else
               0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))))
        y = (act * (h @ lp["w_up"])) @ lp["w_down"]
        x = x + (norm(y, lp["post_mlp_norm"]) if cfg.post_norms else y)
    x = norm(x, p["final_norm"])
    logits = x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])
    if cfg.final_softcap:
        logits = cfg.final_softcap * np.tanh(logits / cfg.final_softcap)
    return logits


@pytest.mark.parametrize("cfg", [GEMMA, MISC], ids=["gemma", "misc"])
def test_forward_equals_an_independent_numpy_decoder(cfg):
    params = perturbed_params(cfg)
    tokens = tokens_of(cfg, 2, 13)
    got = forward(params, tokens, cfg)
    np.testing.assert_allclose(np.asarray(got), numpy_forward(params, tokens, cfg),
                               atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("cfg, changes", [
    (GEMMA, [dict(attn_softcap=None), dict(final_softcap=None), dict(sliding_window=12),
             dict(sliding_rope=None), dict(query_pre_attn_scalar=None),
             dict(mlp_activation="silu"), dict(embed_scale=False), dict(norm_weight_offset=0.0),
             dict(qk_norm=None)]),
    (MISC, [dict(attn_sinks=False), dict(attn_output_gate=False), dict(nope_layers=()),
            dict(layer_types=("full_attention",) * 4, attention_chunk_size=None)]),
], ids=["gemma", "misc"])
def test_each_feature_changes_the_output(cfg, changes):
    """No feature is a no-op at these shapes and weights (else the comparison with the NumPy
    decoder proves nothing about it): switching each off changes the NumPy decoder's logits."""
    params = perturbed_params(cfg)
    tokens = tokens_of(cfg, 1, 13)
    base = numpy_forward(params, tokens, cfg)
    for change in changes:
        other = dataclasses.replace(cfg, **change)
        p = {**params, "layers": {k: v for k, v in params["layers"].items()
                                  if k in param_shapes(other)["layers"]}}
        assert np.abs(numpy_forward(p, tokens, other) - base).max() > 1e-3, change


# ------------------------------------------------------------------ backends and gradients

def _loss(params, tokens, cfg):
    logits = forward(params, tokens, cfg)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                         tokens[:, 1:, None], -1))


@pytest.mark.parametrize("cfg", [GEMMA, MISC], ids=["gemma", "misc"])
def test_pallas_agrees_with_xla_in_values_and_gradients(cfg):
    """(xla against reference for soft-caps and sinks: the attention sweeps.)"""
    impl = "pallas"
    params = perturbed_params(cfg, seed=2)
    tokens = tokens_of(cfg, 2, 11, seed=3)
    other = dataclasses.replace(cfg, attention=AttentionConfig(impl=impl, block_q=8, block_k=8))
    want, want_g = jax.value_and_grad(_loss)(params, tokens, cfg)
    got, got_g = jax.value_and_grad(_loss)(params, tokens, other)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-4)


# ------------------------------------------------------------------ the scan over the schedule

def test_schedule_scans_repeats_of_the_pattern():
    S, F = "sliding", "full"
    assert schedule([F] * 6) == ((0, 1, 6),)
    assert schedule([S, S, S, S, S, F] * 4 + [S, S]) == ((0, 6, 4), (24, 2, 1))
    assert schedule([S, F] * 3) == ((0, 2, 3),)
    assert schedule([F, F, S, S, S]) == ((0, 1, 2), (2, 1, 3))  # Qwen2's max_window_layers


def test_compiled_program_does_not_grow_with_depth_of_a_patterned_schedule():
    tokens = jnp.zeros((1, 8), jnp.int32)

    def hlo_lines(repeats):
        cfg = dataclasses.replace(GEMMA, num_layers=3 * repeats + 2,
                                  layer_types=("sliding_attention", "sliding_attention",
                                               "full_attention") * repeats
                                  + ("sliding_attention",) * 2)
        return len(jax.jit(forward, static_argnums=2).lower(param_shapes(cfg), tokens, cfg)
                   .as_text().splitlines())

    assert hlo_lines(2) == hlo_lines(6)


def test_scanned_schedule_equals_unrolled_layers():
    params = perturbed_params(GEMMA)
    x = jax.random.normal(jax.random.key(5), (1, 9, GEMMA.hidden_size))

    def attention(inputs, xs, carry):  # a stand-in attention reading xs, index and carry
        out = jnp.einsum("bte,ehd->bthd", inputs.h, inputs.params["wq"])
        return out * (1.0 + xs), inputs.index, carry + 1

    xs = jnp.arange(GEMMA.num_layers, dtype=jnp.float32)
    got, ys, carry = run_layers(x, params["layers"], GEMMA, attention, xs=xs, carry=0)
    want, ys_u, carry_u = run_layers(x, params["layers"], GEMMA, attention,
                                     xs=tuple(xs), carry=0, unrolled=True)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(ys, jnp.arange(GEMMA.num_layers))
    assert carry == carry_u == GEMMA.num_layers


# ------------------------------------------------------------------ the KV cache

def test_greedy_decoding_through_the_cache_equals_rerunning_forward():
    """Each generated token is the argmax of forward over the prompt and the tokens before it
    (one forward over the whole continuation gives every step's logits: it is causal)."""
    cfg = GEMMA
    params = perturbed_params(cfg, seed=4)
    prompts = tokens_of(cfg, 2, 7, seed=5)
    lengths = [7, 5]
    out, _ = generate(params, cfg, prompts, lengths=jnp.asarray(lengths, jnp.int32),
                      max_new_tokens=6)
    for b, n in enumerate(lengths):
        seq = jnp.concatenate([prompts[b, :n], out[b]])[None]
        want = jnp.argmax(forward(params, seq, cfg)[0, n - 1:n + 5], -1)
        np.testing.assert_array_equal(out[b], want)


@pytest.mark.parametrize("cfg", [GEMMA, dataclasses.replace(GEMMA, attn_sinks=True)],
                         ids=["gemma", "gemma+sinks"])
def test_prefill_and_decode_logits_equal_forward(cfg):
    params = perturbed_params(cfg, seed=6)
    tokens = tokens_of(cfg, 1, 12, seed=7)
    want = forward(params, tokens, cfg)
    logits, cache = prefill(params, tokens[:, :8], cfg, max_new_tokens=4)
    # Sliding layers keep a ring buffer of their window; the full layer every token and room.
    assert cache.layer_slots == (4, 4, 12, 4, 4)
    np.testing.assert_allclose(logits, want[:, 7], atol=2e-5, rtol=2e-5)
    for t in range(8, 12):
        logits, cache = decode_step(params, cache, tokens[:, t], cfg)
        np.testing.assert_allclose(logits, want[:, t], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("press", [SnapKV(0.5, window_size=3, kernel_size=3),
                                   StreamingLLM(0.5, n_sink=2)], ids=["snapkv", "streaming"])
def test_presses_run_on_a_windowed_model_and_keep_every_entry_at_full_budget(press):
    """A press on a Gemma-3-shaped model: at compression ratio 0 it is the full cache; at 0.5
    it halves each layer's entries and decoding stays finite."""
    cfg = GEMMA
    params = perturbed_params(cfg, seed=8)
    tokens = tokens_of(cfg, 1, 12, seed=9)
    full, _ = prefill(params, tokens, cfg)
    none, _ = prefill(params, tokens, cfg, policy=dataclasses.replace(press, compression_ratio=0.0))
    np.testing.assert_allclose(none, full, atol=2e-5, rtol=2e-5)
    logits, cache = prefill(params, tokens, cfg, policy=press, max_new_tokens=2)
    # The press compresses the global layer (12 -> 6 entries); sliding layers keep 4.
    assert cache.layer_slots == (4, 4, 8, 4, 4)
    assert [int(cache.layer(i)["length"].max()) for i in range(5)] == [4, 4, 6, 4, 4]
    logits, cache = decode_step(params, cache, jnp.argmax(logits, -1), cfg)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_decode_presses_compress_the_global_layers_and_sliding_ones_keep_their_window():
    cfg = GEMMA
    params = perturbed_params(cfg, seed=14)
    tokens = tokens_of(cfg, 1, 16, seed=15)
    press = Decoding(Knorm(), compression_interval=2, target_size=5,
                     hidden_states_buffer_size=0)
    logits, cache = prefill(params, tokens[:, :10], cfg, max_new_tokens=6, layout="uniform")
    for t in range(10, 16):
        logits, cache = decode_step(params, cache, tokens[:, t], cfg, policy=press)
        assert bool(jnp.all(jnp.isfinite(logits)))
    lengths = [int(cache.length[i].max()) for i in range(cfg.num_layers)]
    kept = np.asarray(cache.kept_positions(0)[0, 0])
    # Sliding layers: their window of the prompt (6..9), then every decoded token appended
    # (masked by position, never pressed); the global layer: the press's 5 entries.
    assert lengths == [10, 10, 5, 10, 10], lengths
    np.testing.assert_array_equal(kept[:10], np.arange(6, 16))


def test_chunked_layers_are_refused_by_the_cache_with_a_clear_error():
    params = perturbed_params(MISC)
    with pytest.raises(ValueError, match="chunked_attention.*run them through"):
        prefill(params, tokens_of(MISC, 1, 6), MISC)


# ------------------------------------------------------------------ memory and the ring

def test_transformer_xl_on_a_windowed_model_equals_forward():
    cfg = dataclasses.replace(GEMMA, attn_softcap=None)  # the memory kinds do not cap logits
    params = perturbed_params(cfg, seed=10)
    tokens = tokens_of(cfg, 1, 16, seed=11)
    got, _ = run_segments(params, tokens, cfg, memory=TransformerXL(mem_len=16), segment_len=8)
    np.testing.assert_allclose(got, forward(params, tokens, cfg), atol=3e-5, rtol=3e-5)
    with pytest.raises(ValueError, match="attn_softcap"):
        run_segments(params, tokens, GEMMA, memory=TransformerXL(mem_len=16), segment_len=8)


def test_ring_attention_model_equals_unsharded(devices):
    cfg = dataclasses.replace(GEMMA, attn_sinks=True)
    ring = dataclasses.replace(cfg, attention=AttentionConfig(impl="ring", block_q=8,
                                                              block_k=8))
    params = perturbed_params(cfg, seed=12)
    tokens = tokens_of(cfg, 1, 32, seed=13)
    want, want_g = jax.value_and_grad(_loss)(params, tokens, cfg)
    with jax.set_mesh(make_mesh((1, 1, 1, 8))):
        got, got_g = jax.jit(jax.value_and_grad(_loss), static_argnums=2)(params, tokens, ring)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-5, rtol=3e-4)
