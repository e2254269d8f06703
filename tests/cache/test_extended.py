"""KV-cache decoding under Self-Extend, ReRoPE and leaky ReRoPE (`lcm.cache.extended`): prefill
and every decode step equal `lcm.model.forward`, generate equals the forward-only greedy loop,
on right-padded batches past the window and group boundaries; argument errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import SnapKV
from lcm.cache import prefill as rope_prefill
from lcm.cache.extended import ExtendedCache, decode_step, generate, prefill
from lcm.config import AttentionConfig, ModelConfig, PositionConfig
from lcm.eval import greedy_generate
from lcm.model import forward, init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
POSITIONS = {
    "self_extend": PositionConfig(type="self_extend", window=6, group_size=3),
    "self_extend_frac": PositionConfig(type="self_extend", window=5, group_size=3),
    "rerope_log": PositionConfig(type="rerope", window=5, log_scale_length=8),
    "leaky_rerope": PositionConfig(type="leaky_rerope", window=4, leak=4.0, log_scale_length=6),
}
fwd = jax.jit(forward, static_argnames=("cfg",))


def setup(kind, **changes):
    cfg = dataclasses.replace(CFG, positions=POSITIONS[kind], **changes)
    return cfg, init_params(cfg, jax.random.key(0))[0]


def tokens_of(seed, batch, seq):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, CFG.vocab_size, jnp.int32)


@pytest.mark.parametrize("kind,changes", [
    ("self_extend", {}), ("self_extend_frac", {}), ("rerope_log", {}), ("leaky_rerope", {}),
    ("self_extend", {"sliding_window": 9, "qkv_bias": True})])
def test_prefill_and_decode_steps_equal_forward(kind, changes):
    cfg, params = setup(kind, **changes)
    seq = tokens_of(1, 2, 24)
    want = np.asarray(fwd(params, seq, cfg))
    lengths = np.array([13, 8])
    prompts = jnp.where(jnp.arange(13)[None] < lengths[:, None], seq[:, :13], 0)
    # chunk_size 4: the prompt's two-pass attention runs in blocks smaller than the window.
    logits, cache = prefill(params, prompts, cfg, lengths=lengths, chunk_size=4, all_logits=True)
    np.testing.assert_allclose(logits[0], want[0, :13], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[1, :8], want[1, :8], atol=1e-5, rtol=1e-5)
    logits, cache = prefill(params, prompts, cfg, lengths=lengths, max_new_tokens=11)
    rows = np.arange(2)
    np.testing.assert_allclose(logits, want[rows, lengths - 1], atol=1e-5, rtol=1e-5)
    assert isinstance(cache, ExtendedCache) and cache.capacity == 24
    assert cache.k.shape == (2, 2, 2, 24, 8)
    # Row 1 starts 5 tokens behind: the rows cross the window and group boundaries at
    # different steps, and both reach distances of 2-4 windows.
    for i in range(11):
        pos = lengths + i
        logits, cache = decode_step(params, cache, seq[rows, pos], cfg)
        np.testing.assert_allclose(logits, want[rows, pos], atol=1e-4, rtol=1e-5,
                                   err_msg=f"step {i}")
    np.testing.assert_array_equal(cache.next_pos, lengths + 11)
    np.testing.assert_array_equal(cache.pos[1], np.where(np.arange(24) < 19, np.arange(24), -1))


def test_decode_differs_from_plain_rope_past_the_window():
    """The extended path is not plain RoPE in disguise: past the window the logits move."""
    cfg, params = setup("self_extend")
    seq = tokens_of(2, 1, 20)
    plain = dataclasses.replace(cfg, positions=PositionConfig())
    want = np.asarray(fwd(params, seq, plain))
    logits, _ = prefill(params, seq, cfg)
    assert np.abs(np.asarray(logits) - want[:, -1]).max() > 1e-2


@pytest.mark.parametrize("kind", ["self_extend", "rerope_log", "leaky_rerope"])
def test_generate_equals_forward_greedy(kind):
    cfg, params = setup(kind)
    prompts = tokens_of(3, 3, 14)
    lengths = jnp.array([14, 7, 11], jnp.int32)
    got, count = generate(params, cfg, prompts, lengths=lengths, max_new_tokens=9)
    want, want_count = greedy_generate(params, cfg, prompts, lengths=lengths, max_new_tokens=9)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(count, want_count)


def test_generate_stops_per_row_and_pads():
    cfg, params = setup("self_extend")
    prompts = tokens_of(8, 2, 12)
    lengths = jnp.array([12, 8], jnp.int32)
    free, _ = generate(params, cfg, prompts, lengths=lengths, max_new_tokens=8)
    # A token row 1 emits mid-way and row 0 never: row 1 stops there and pads, row 0 goes on.
    stop = next(int(t) for t in np.asarray(free[1, 2:]) if t not in np.asarray(free[0]))
    got, count = generate(params, cfg, prompts, lengths=lengths, max_new_tokens=8,
                          stop_tokens=(stop,), pad_token=60)
    want, want_count = greedy_generate(params, cfg, prompts, lengths=lengths, max_new_tokens=8,
                                       stop_tokens=(stop,), pad_token=60)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(count, want_count)
    n = int(count[1])
    assert 3 <= n < 8 and int(got[1, n - 1]) == stop and (np.asarray(got[1, n:]) == 60).all()
    assert int(count[0]) == 8


def test_sampled_generate_is_reproducible_and_varies_with_key():
    cfg, params = setup("self_extend")
    prompts = tokens_of(4, 2, 10)
    run = dict(max_new_tokens=12, temperature=1.5, top_k=20, top_p=0.9)
    a, _ = generate(params, cfg, prompts, key=jax.random.key(1), **run)
    b, _ = generate(params, cfg, prompts, key=jax.random.key(1), **run)
    c, _ = generate(params, cfg, prompts, key=jax.random.key(2), **run)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


def test_cache_is_a_pytree_and_decodes_under_jit():
    cfg, params = setup("rerope_log")
    _, cache = prefill(params, tokens_of(5, 2, 6), cfg, max_new_tokens=2)
    leaves, tree = jax.tree.flatten(cache)
    assert len(leaves) == 4 and jax.tree.unflatten(tree, leaves).position == cfg.positions
    assert cache.nbytes() == 2 * (2 * 2 * 8 * 2 * 8 * 4) + 2 * 8 * 4 + 2 * 4
    step = jax.jit(decode_step, static_argnames=("cfg",))
    got, _ = step(params, cache, jnp.array([1, 2]), cfg)
    want, _ = decode_step(params, cache, jnp.array([1, 2]), cfg)
    np.testing.assert_allclose(got, want, atol=1e-6)


def _errors():
    cfg, params = setup("self_extend")
    plain = dataclasses.replace(cfg, positions=PositionConfig())
    alibi = dataclasses.replace(cfg, positions=PositionConfig(type="alibi"))
    other = dataclasses.replace(cfg, positions=POSITIONS["self_extend_frac"])
    toks = tokens_of(6, 2, 8)
    _, cache = prefill(params, toks, cfg, max_new_tokens=1)
    _, full = decode_step(params, cache, jnp.array([1, 2]), cfg)
    _, rope_cache = rope_prefill(params, toks, plain, max_new_tokens=1)
    step = jnp.array([1, 2])
    return [
        (lambda: prefill(params, toks, plain), "lcm.cache.prefill / decode_step / generate"),
        (lambda: generate(params, alibi, toks, max_new_tokens=2), "positions.type='alibi'"),
        (lambda: generate(params, cfg, toks, max_new_tokens=2, policy=SnapKV(0.5)),
         "policy=.*no cache policy"),
        (lambda: generate(params, cfg, toks, max_new_tokens=2, decode_policy=SnapKV(0.5)),
         "decode_policy="),
        (lambda: generate(params, cfg, toks, max_new_tokens=0), "max_new_tokens=0"),
        (lambda: generate(params, cfg, toks, max_new_tokens=2, temperature=1.0), "key=None"),
        (lambda: prefill(params, toks, cfg, lengths=[0, 8]), r"lengths=\[0, 8\]"),
        (lambda: prefill(params, toks, cfg, lengths=[3]), "lengths: shape"),
        (lambda: prefill(params, toks[0], cfg), "tokens: shape"),
        (lambda: prefill(params, toks, cfg, chunk_size=0), "chunk_size=0"),
        (lambda: prefill(params, toks, cfg, max_new_tokens=-1), "max_new_tokens=-1"),
        (lambda: decode_step(params, full, step, cfg), "cache is full: next position 9"),
        (lambda: decode_step(params, cache, step, other), "filled under"),
        (lambda: decode_step(params, rope_cache, step, cfg), "expected an ExtendedCache"),
        (lambda: decode_step(params, cache, jnp.array([1, 2, 3]), cfg), r"tokens: shape \(3,\)"),
        (lambda: decode_step(params, cache, step, dataclasses.replace(cfg, num_layers=3)),
         "does not fit cfg"),
    ]


def test_argument_errors():
    for call, match in _errors():
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.slow
def test_smollm2_self_extend_generate_equals_forward_greedy():
    """SmolLM2-135M (f32), Self-Extend window 64 / group 4 on ~300-token prompts: the cached
    decode gives the forward-only greedy loop's tokens."""
    from lcm.io import load_smollm2
    cfg, params, tok = load_smollm2()
    cfg = dataclasses.replace(cfg, positions=PositionConfig(type="self_extend", window=64,
                                                            group_size=4),
                              attention=AttentionConfig(impl="xla", block_q=128, block_k=128))
    text = ("The lighthouse keeper wrote in his log every evening. " * 30
            + "The secret code is 7319. Remember it. " + "The sea was calm that night. " * 8
            + "What is the secret code? The secret code is")
    ids = tok.encode(text)
    assert 280 <= len(ids) <= 420, len(ids)
    prompts = np.zeros((2, len(ids)), np.int32)
    prompts[0] = ids
    prompts[1, :len(ids) - 40] = ids[40:]
    lengths = jnp.array([len(ids), len(ids) - 40], jnp.int32)
    got, count = generate(params, cfg, jnp.asarray(prompts), lengths=lengths, max_new_tokens=6)
    want, want_count = greedy_generate(params, cfg, jnp.asarray(prompts), lengths=lengths,
                                       max_new_tokens=6)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(count, want_count)
