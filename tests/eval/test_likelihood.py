"""`lcm.eval.loglikelihood` / `perplexity`: chunked over the KV cache they equal the one-shot
forward's log_softmax + gather (tiny models with odd lengths, ragged rows, sliding windows and
soft-caps; SmolLM2 on real text); the memory path equals `run_segments`' own log-probs; a
decode-time StreamingLLM equals attention under a sink + window mask and decode-time presses
equal decode_step token by token; temporaries do not grow
with T x vocab; bad arguments raise ValueErrors naming them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.attention import attend
from lcm.attention.masks import SinkWindow
from lcm.cache import H2O, SnapKV, StreamingLLM, decode_step, prefill
from lcm.config import AttentionConfig, ModelConfig
from lcm.eval import loglikelihood, perplexity
from lcm.eval.likelihood import cache_loglik_jit
from lcm.memory import TransformerXL, run_segments
from lcm.model import embed, forward, init_params, rope_tables, run_layers, unembed
from lcm.positions import apply_rope

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
fwd = jax.jit(forward, static_argnames=("cfg",))


def setup(cfg=CFG, batch=2, seq=23, seed=0):
    params = init_params(cfg, jax.random.key(seed))[0]
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch, seq), 0, cfg.vocab_size,
                                dtype=jnp.int32)
    return params, tokens


def reference(params, tokens, cfg):
    """log_softmax(forward) gathered at the next token: [B, T - 1]."""
    logp = jax.nn.log_softmax(fwd(params, tokens, cfg)[:, :-1].astype(jnp.float32), -1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


VARIANTS = {
    "plain": ({}, (5, 1)),
    "sliding": ({"sliding_window": 6, "layer_types": ("sliding_attention", "full_attention",
                                                      "sliding_attention")}, (22,)),
    "softcap": ({"attn_softcap": 5.0, "final_softcap": 3.0}, (5,)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_equals_forward(name):
    variant, chunks = VARIANTS[name]
    cfg = dataclasses.replace(CFG, **variant)
    # T = 23: 22 predictions; chunk 5 does not divide them, 22 runs them at once (the window
    # of 6 then overflows inside one chunk), 1 token by token.
    params, tokens = setup(cfg)
    want = reference(params, tokens, cfg)
    for chunk in chunks:
        got = loglikelihood(params, cfg, tokens, chunk=chunk)
        assert got.shape == (2, 22) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=f"chunk={chunk}")
    # ragged rows: row 1 has 11 real tokens; its 10 predictions are the causal forward's
    # (which reads tokens[1, :11] only) whatever the padding holds
    padded = tokens.at[1, 11:].set(10 ** 6)  # padding ids are never read
    got = loglikelihood(params, cfg, padded, lengths=jnp.array([23, 11]), chunk=chunks[0])
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
    alone = want[1, :10]
    np.testing.assert_allclose(got[1, :10], alone, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(got[1, 10:], 0.0)
    ppl = perplexity(params, cfg, tokens, lengths=jnp.array([23, 11]), chunk=chunks[0])
    np.testing.assert_allclose(ppl, [np.exp(-want[0].mean()), np.exp(-alone.mean())],
                               rtol=1e-5)


@pytest.mark.slow
def test_long_document_perplexity_equals_one_shot():
    """4k tokens, 512 at a time, equals the one-shot forward (a batch of two documents)."""
    cfg = dataclasses.replace(CFG, attention=AttentionConfig(impl="xla", block_q=256,
                                                             block_k=256))
    params, tokens = setup(cfg, seq=4096)
    want = jnp.exp(-reference(params, tokens, cfg).mean(-1))
    got = perplexity(params, cfg, tokens, chunk=512)
    assert got.shape == (2,)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_memory_kind_equals_run_segments():
    params, tokens = setup(seq=37)
    memory = TransformerXL(mem_len=16)
    got = loglikelihood(params, CFG, tokens, chunk=8, memory=memory)
    own, _ = run_segments(params, tokens, CFG, memory=memory, segment_len=8,
                          targets=jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))))
    np.testing.assert_allclose(got, own[:, :-1], atol=1e-6, rtol=1e-6)
    # with segments, XL differs from the full forward (it sees only mem_len past tokens) ...
    assert float(jnp.abs(got - reference(params, tokens, CFG)).max()) > 1e-3
    # ... and a ragged row's padding (other ids than the full row's) reaches no prediction
    ragged = loglikelihood(params, CFG, tokens.at[1, 19:].set(10 ** 6), chunk=8,
                           memory=memory, lengths=jnp.array([37, 19]))
    np.testing.assert_allclose(ragged[0], got[0], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ragged[1, :18], got[1, :18], atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(ragged[1, 18:], 0.0)
    np.testing.assert_allclose(perplexity(params, CFG, tokens, chunk=8, memory=memory),
                               jnp.exp(-got.mean(-1)), rtol=1e-6)


def sink_window_reference(params, tokens, cfg, sinks, window):
    """Every layer attends under SinkWindow(sinks, window) at original positions (dense)."""
    T = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(T)[None], tokens.shape)
    tables = rope_tables(cfg, T)

    def attention(inputs, xs, carry):
        inv_freq, factor = tables[inputs.kind.rope]
        q = apply_rope(inputs.q, positions, inv_freq, factor)
        k = apply_rope(inputs.k, positions, inv_freq, factor)
        out = attend(q, k, inputs.v, SinkWindow(sinks, window), impl="reference")
        return out, xs, carry

    x, _, _ = run_layers(embed(params, tokens, cfg), params["layers"], cfg, attention)
    logp = jax.nn.log_softmax(unembed(params, x, cfg)[:, :-1], -1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


def test_streaming_llm_policy():
    """StreamingLLM(budget=n, n_sink=s) decoding token by token: each token sees the s sinks
    and the n + 1 - s newest tokens (itself included), i.e. a SinkWindow mask."""
    params, tokens = setup(seq=21)
    got = loglikelihood(params, CFG, tokens, policy=StreamingLLM(budget=8, n_sink=2),
                        lengths=jnp.array([21, 13]))
    want = sink_window_reference(params, tokens, CFG, 2, 7)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got[1, :12], want[1, :12], atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(got[1, 12:], 0.0)
    assert float(jnp.abs(want - reference(params, tokens, CFG)).max()) > 1e-3  # eviction shows


@pytest.mark.parametrize("policy", [H2O(hh_size=3, recent_size=5),
                                    StreamingLLM(budget=8, n_sink=2, positions="cache")],
                         ids=["H2O", "StreamingLLM-cache-ranks"])
def test_decode_press_equals_decode_step(policy):
    """A decode-time press from the first token on: equal to prefill of the first token then
    decode_step(..., policy=) token by token."""
    params, tokens = setup(seq=21)
    got = loglikelihood(params, CFG, tokens, policy=policy)
    logits, cache = prefill(params, tokens[:, :1], CFG, policy=policy, max_new_tokens=9,
                            layout="uniform")
    want = []
    for t in range(1, 21):
        want.append(jax.nn.log_softmax(logits)[jnp.arange(2), tokens[:, t]])
        if t < 20:
            logits, cache = decode_step(params, cache, tokens[:, t], CFG, policy=policy)
    np.testing.assert_allclose(got, jnp.stack(want, 1), atol=2e-5, rtol=2e-5)
    assert float(jnp.abs(got - reference(params, tokens, CFG)).max()) > 1e-3  # it evicted


@pytest.mark.slow
def test_temporaries_do_not_scale_with_tokens_times_vocab():
    """The compiled chunked function at 512 and 2048 tokens (vocab 4096, chunk 128): its
    temporaries grow by the KV cache only, far less than the [T, vocab] float32 logits a
    one-shot forward holds (which the same measurement sees there)."""
    cfg = dataclasses.replace(CFG, vocab_size=4096, num_layers=2, attention=AttentionConfig(
        impl="xla", block_q=128, block_k=128))
    params = init_params(cfg, jax.random.key(0))[0]

    def temp(fn, T):
        tokens = jnp.zeros((1, T), jnp.int32)
        lengths = jnp.full((1,), T, jnp.int32)
        return fn.lower(params, tokens, lengths).compile().memory_analysis().temp_size_in_bytes

    chunked = jax.jit(lambda p, t, n: cache_loglik_jit(p, t, n, cfg=cfg, chunk=128))
    one_shot = jax.jit(lambda p, t, n: reference(p, t, cfg))
    logits_bytes = 1536 * cfg.vocab_size * 4  # [T, vocab] float32 from 512 to 2048 tokens
    grow = temp(chunked, 2048) - temp(chunked, 512)
    assert grow < logits_bytes / 8, (grow, logits_bytes)
    assert temp(one_shot, 2048) - temp(one_shot, 512) >= logits_bytes


@pytest.mark.slow
def test_smollm2_real_texts():
    """SmolLM2-135M on three English texts of different lengths, batched and ragged, 64
    tokens at a time: equal to the one-shot forward's log-probs of each text."""
    from lcm.io import load_smollm2
    cfg, params, tok = load_smollm2()
    cfg = dataclasses.replace(cfg, attention=AttentionConfig(impl="xla", block_q=64,
                                                             block_k=64))
    texts = [
        "The lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the "
        "wick, polished the great lens and wrote the weather into a leather-bound log. Ships "
        "passing the headland saw the beam sweep across the water once every twelve seconds.",
        "To make a simple bread, mix flour, water, salt and a little yeast, knead the dough "
        "until it is smooth, and leave it to rise in a warm place for about two hours.",
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It takes "
        "place in the chloroplasts of plant cells, where chlorophyll absorbs mostly red and "
        "blue light and reflects green, which is why leaves look green to us. The sugar feeds "
        "the plant, and the oxygen is released into the air through small pores in the leaves.",
    ]
    ids = [tok.encode(t) for t in texts]
    T = max(map(len, ids))
    tokens = jnp.asarray([i + [0] * (T - len(i)) for i in ids], jnp.int32)
    lengths = jnp.asarray([len(i) for i in ids], jnp.int32)
    got = loglikelihood(params, cfg, tokens, lengths=lengths, chunk=64)
    ppl = perplexity(params, cfg, tokens, lengths=lengths, chunk=64)
    one_shot = reference(params, tokens, cfg)  # causal: a row's padding comes after it
    for b, row in enumerate(ids):
        n = len(row)
        want = one_shot[b, :n - 1]
        np.testing.assert_allclose(got[b, :n - 1], want, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(got[b, n - 1:], 0.0)
        np.testing.assert_allclose(ppl[b], np.exp(-want.mean()), rtol=1e-4)
    assert float(ppl.max()) < 1000.0  # reading English (uniform guessing: 49152)


def test_bad_inputs():
    params, tokens = setup(seq=9)
    cases = [
        (dict(cfg="llama"), "cfg="),
        (dict(tokens=tokens[0]), "tokens: shape"),
        (dict(tokens=tokens[:, :1]), "tokens has shape"),
        (dict(tokens=tokens.astype(jnp.float32)), "tokens: shape"),
        (dict(tokens=tokens.at[0, 3].set(61)), "tokens holds id 61"),
        (dict(lengths=jnp.array([9])), "lengths: shape"),
        (dict(lengths=jnp.array([9, 1])), r"lengths=\[9, 1\]"),
        (dict(lengths=jnp.array([9, 10])), r"lengths=\[9, 10\]"),
        (dict(chunk=0), "chunk=0"),
        (dict(chunk=2.5), "chunk=2.5"),
        (dict(policy=StreamingLLM(budget=4), memory=TransformerXL(mem_len=4)), "pass one"),
        (dict(policy=SnapKV(0.5)), "policy="),
        (dict(policy=StreamingLLM(0.5)), "budget"),
        (dict(memory="xl"), "memory='xl'"),
        (dict(memory_params={}), "memory_params"),
    ]
    for kwargs, match in cases:
        args = dict(cfg=CFG, tokens=tokens)
        args.update({k: kwargs.pop(k) for k in ("cfg", "tokens") if k in kwargs})
        for fn in (loglikelihood, perplexity):
            with pytest.raises(ValueError, match=match):
                fn(params, args["cfg"], args["tokens"], **kwargs)
    sliding = dataclasses.replace(CFG, sliding_window=4)
    with pytest.raises(ValueError, match="policy= runs on models"):
        loglikelihood(params, sliding, tokens, policy=StreamingLLM(budget=4))
