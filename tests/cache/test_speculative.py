"""Self-speculative decoding: greedy output equals plain greedy decoding token for token (tiny
models with stop tokens and padded rows, and SmolLM2 on a text prompt); sampling follows the
target distribution (a chi-square test on a tiny model whose draft distribution differs);
argument errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import SnapKV, Speculative, StreamingLLM, generate
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import forward, init_params

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))


def sharp_model(cfg, seed=0, scale=3.0):
    """Weights scaled up so that greedy continuations depend on the context."""
    params = init_params(cfg, jax.random.key(seed))[0]
    return jax.tree.map(lambda x: x * scale, params)


@pytest.mark.parametrize("draft,gamma,variant", [
    (StreamingLLM(budget=8), 3, {}),
    (SnapKV(0.5, window_size=4), 4, {"sliding_window": 9, "attn_sinks": True})])
def test_greedy_equals_plain_decoding(draft, gamma, variant):
    cfg = dataclasses.replace(CFG, **variant)
    params = sharp_model(cfg)
    prompts = jax.random.randint(jax.random.key(1), (3, 40), 0, cfg.vocab_size, jnp.int32)
    lengths = jnp.array([40, 31, 25])
    plain, count = generate(params, cfg, prompts, lengths=lengths, max_new_tokens=20,
                            stop_tokens=(5,))
    got, got_count, stats = generate(params, cfg, prompts, lengths=lengths, max_new_tokens=20,
                                     stop_tokens=(5,), speculative=Speculative(draft, gamma),
                                     return_stats=True)
    np.testing.assert_array_equal(got, plain)
    np.testing.assert_array_equal(got_count, count)
    assert int(stats["rounds"]) < 20 + 1 and np.all(stats["accepted"] <= stats["drafted"])


def test_sampling_follows_the_target_distribution():
    """3000 rows of one prompt, temperature 1: the empirical joint of the first two tokens
    (the second one drafted, then accepted or resampled) against the exact joint from
    forward; the draft's own distribution is far from it, so acceptance is exercised."""
    cfg = ModelConfig(vocab_size=8, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8, intermediate_size=24,
                      attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
    params = sharp_model(cfg, seed=2, scale=2.0)
    prompt = jax.random.randint(jax.random.key(3), (1, 16), 0, 8, jnp.int32)
    n = 3000
    tokens, _, stats = generate(
        params, cfg, jnp.repeat(prompt, n, 0), max_new_tokens=3, temperature=1.0,
        key=jax.random.key(4), speculative=Speculative(StreamingLLM(budget=2), gamma=2),
        return_stats=True)
    # exact target joint p(t1) p(t2 | t1) and the draft's p over t2 (a 2-entry cache + t1)
    p1 = jax.nn.softmax(forward(params, prompt, cfg)[0, -1])
    both = jnp.concatenate([jnp.repeat(prompt, 8, 0), jnp.arange(8, dtype=jnp.int32)[:, None]],
                           1)
    p2 = jax.nn.softmax(forward(params, both, cfg)[:, -1], -1)
    joint = np.asarray(p1[:, None] * p2, np.float64)
    counts = np.zeros((8, 8))
    np.add.at(counts, (np.asarray(tokens[:, 0]), np.asarray(tokens[:, 1])), 1)
    expected = n * joint
    cells = expected > 5
    chi2 = (((counts - expected) ** 2 / np.maximum(expected, 1e-12))[cells]).sum()
    df = cells.sum() - 1
    assert chi2 < df + 5 * np.sqrt(2 * df), (chi2, df)  # about 5 standard deviations
    assert abs(counts[~cells].sum() - expected[~cells].sum()) < 5 * np.sqrt(
        expected[~cells].sum() + 1)
    # the draft disagrees often enough that rejection and resampling matter
    rate = float(stats["accepted"].sum() / stats["drafted"].sum())
    assert 0.05 < rate < 0.95, rate


@pytest.mark.slow
def test_smollm2_greedy_equals_plain_decoding():
    """SmolLM2-135M on a ~350-token text, StreamingLLM(budget=64) drafting 4 tokens: the
    same 24 greedy tokens as plain decoding."""
    from lcm.io import load_smollm2
    cfg, params, tok = load_smollm2()
    cfg = dataclasses.replace(cfg, attention=AttentionConfig(impl="xla", block_q=128,
                                                             block_k=128))
    text = ("A tidal pool forms where the rocks hold water after the tide goes out. "
            "Crabs, anemones and small fish live there until the sea returns. " * 12
            + "Question: what lives in a tidal pool? Answer:")
    prompts = jnp.asarray([tok.encode(text)], jnp.int32)
    assert 250 <= prompts.shape[1] <= 450, prompts.shape
    plain, _ = generate(params, cfg, prompts, max_new_tokens=24)
    got, _, stats = generate(params, cfg, prompts, max_new_tokens=24, return_stats=True,
                             speculative=Speculative(StreamingLLM(budget=64), gamma=4))
    np.testing.assert_array_equal(got, plain)
    assert int(stats["accepted"][0]) > 0


def test_errors():
    params = init_params(CFG, jax.random.key(0))[0]
    prompts = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="Speculative.gamma=0"):
        Speculative(StreamingLLM(budget=4), gamma=0)
    with pytest.raises(ValueError, match="Speculative.draft="):
        Speculative("snapkv")
    with pytest.raises(ValueError, match="policy=SnapKV.*must be None"):
        generate(params, CFG, prompts, max_new_tokens=2, policy=SnapKV(0.5),
                 speculative=Speculative(StreamingLLM(budget=4)))
    with pytest.raises(ValueError, match="return_stats needs it"):
        generate(params, CFG, prompts, max_new_tokens=2, return_stats=True)
