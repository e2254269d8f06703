"""KIVI, Quest and DuoAttention against NumPy implementations of their papers' definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache import KVCache, decode_step, prefill
from lcm.cache.presses.duo import (DuoAttention, duo_append, duo_attention, duo_prefill,
                           duo_prefill_attention)
from lcm.cache.presses.kivi import (KIVI, kivi_append, kivi_attention, kivi_prefill, kivi_read,
                            pack_codes, unpack_codes)
from lcm.cache.formats import policy_decode_step, policy_prefill
from lcm.cache.masked_read import masked_attention
from lcm.cache.presses.quest import Quest, page_bounds, quest_attention, update_page_bounds
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import init_params

# ----------------------------------------------------------------------------- NumPy KIVI


def np_quantize(x, bits, axis):
    """KIVI's asymmetric quantization of float32 x over `axis`: (dequantized, codes)."""
    x = x.astype(np.float32)
    lo = x.min(axis, keepdims=True)
    scale = (x.max(axis, keepdims=True) - lo) / np.float32(2 ** bits - 1)
    codes = np.clip(np.round((x - lo) / np.where(scale > 0, scale, 1)), 0, 2 ** bits - 1)
    return codes * scale + lo, codes


def np_kivi_keys(k, bits, G):
    """k [S, D] (S a multiple of G): per channel over groups of G tokens."""
    S, D = k.shape
    deq, _ = np_quantize(k.reshape(S // G, G, D), bits, 1)
    return deq.reshape(S, D)


def np_kivi_values(v, bits, G):
    """v [S, D]: per token over groups of G channels."""
    S, D = v.shape
    deq, _ = np_quantize(v.reshape(S, D // G, G), bits, 2)
    return deq.reshape(S, D)


class NumpyKIVI:
    """KIVI's reference cache flow for one (row, kv head): prefill, then per decode step append
    the token, attend, then quantize (values leaving the last R, keys R at a time)."""

    def __init__(self, k, v, bits, G, R):
        self.bits, self.G, self.R = bits, G, R
        n = len(k)
        nq = n - n % R
        self.kq = np_kivi_keys(k[:nq], bits, G) if nq else np.zeros((0, k.shape[1]), np.float32)
        self.kf = k[nq:]
        vn = max(n - R, 0)
        self.vq = np_kivi_values(v[:vn], bits, G) if vn else np.zeros((0, v.shape[1]), np.float32)
        self.vf = v[vn:]

    def step(self, k, v):
        """Appends one token; returns the (keys, values) attention sees at this step."""
        self.kf = np.concatenate([self.kf, k[None]])
        self.vf = np.concatenate([self.vf, v[None]])
        seen = np.concatenate([self.kq, self.kf]), np.concatenate([self.vq, self.vf])
        if len(self.vf) > self.R:
            self.vq = np.concatenate([self.vq, np_kivi_values(self.vf[:1], self.bits, self.G)])
            self.vf = self.vf[1:]
        if len(self.kf) == self.R:
            self.kq = np.concatenate([self.kq, np_kivi_keys(self.kf, self.bits, self.G)])
            self.kf = self.kf[:0]
        return seen


def np_attention(q, k, v):
    """q [H, D] over k, v [S, D] (one kv head's group): softmax(q k^T / sqrt(D)) v."""
    s = q @ k.T / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


# ----------------------------------------------------------------------------- KIVI tests


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_round_trip(bits):
    codes = jax.random.randint(jax.random.key(bits), (3, 5, 16), 0, 2 ** bits).astype(jnp.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits,lengths", [(2, (21, 8)), (4, (16, 13))])
def test_kivi_matches_numpy_definition(bits, lengths):
    B, T, K, H, D, G, R, steps = 2, 21, 2, 4, 16, 4, 8, 11
    policy = KIVI(bits=bits, group_size=G, residual_length=R)
    key = jax.random.key(bits)
    k, v, q_new, k_new, v_new = (jax.random.normal(kk, shape, jnp.float32) for kk, shape in zip(
        jax.random.split(key, 5), [(B, T, K, D), (B, T, K, D), (steps, B, 1, H, D),
                                   (steps, B, K, D), (steps, B, K, D)]))
    capacity = T + steps
    state = jax.jit(kivi_prefill, static_argnames=("policy", "capacity"))(
        policy, k, v, jnp.asarray(lengths), capacity=capacity)
    refs = [[NumpyKIVI(np.asarray(k[b, :lengths[b], h]), np.asarray(v[b, :lengths[b], h]),
                       bits, G, R) for h in range(K)] for b in range(B)]
    append, attention, read = jax.jit(kivi_append), jax.jit(kivi_attention), jax.jit(kivi_read)
    for t in range(steps):
        state = append(state, k_new[t], v_new[t])
        got_k, got_v, valid = read(state)
        out = attention(q_new[t], state)
        for b in range(B):
            n = lengths[b] + t + 1
            np.testing.assert_array_equal(valid[b, 0], np.arange(capacity) < n)
            for h in range(K):
                want_k, want_v = refs[b][h].step(np.asarray(k_new[t, b, h]),
                                                 np.asarray(v_new[t, b, h]))
                np.testing.assert_allclose(got_k[b, h, :n], want_k, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(got_v[b, h, :n], want_v, rtol=1e-6, atol=1e-6)
                group = slice(h * H // K, (h + 1) * H // K)
                want = np_attention(np.asarray(q_new[t, b, 0, group]), want_k, want_v)
                np.testing.assert_allclose(out[b, 0, group], want, rtol=1e-5, atol=1e-5)
    # Quantization really happened (the reads are not the full-precision tokens) ...
    b, n = 0, lengths[0] + steps
    full_k = np.concatenate([np.asarray(k[b, :lengths[b]]), np.asarray(k_new[:, b])], 0)
    assert np.abs(np.asarray(got_k[b, :, :n - R]).transpose(1, 0, 2) - full_k[:n - R]).max() > 1e-2
    # ... and the residual window is exact.
    np.testing.assert_array_equal(np.asarray(got_k[b, :, n - 1]), full_k[n - 1])


def test_kivi_bytes():
    B, T, K, D, capacity = 1, 1024, 2, 64, 1024
    k = jnp.ones((B, T, K, D), jnp.float32)
    full_bytes = 2 * B * K * capacity * D * 4
    prefill = jax.jit(kivi_prefill, static_argnames=("policy", "capacity"))
    for bits, bound in ((2, 0.2), (4, 0.3)):
        state = prefill(KIVI(bits=bits), k, k, jnp.array([T]), capacity=capacity)
        assert state.nbytes <= bound * full_bytes, (bits, state.nbytes / full_bytes)


def test_kivi_validation():
    with pytest.raises(ValueError, match="bits=3"):
        KIVI(bits=3)
    with pytest.raises(ValueError, match="residual_length=20"):
        KIVI(group_size=8, residual_length=20)
    with pytest.raises(ValueError, match="head_dim=12"):
        KIVI(group_size=8, residual_length=8).check_head_dim(12)
    with pytest.raises(ValueError, match="capacity"):
        kivi_prefill(KIVI(group_size=8, residual_length=8), jnp.zeros((1, 9, 1, 16)),
                     jnp.zeros((1, 9, 1, 16)), jnp.array([9]), capacity=4)


# ----------------------------------------------------------------------------- Quest


def np_quest(q, k, v, n, page, num_pages, keep_last, gqa):
    """Quest's definition for one row. q [H, D]; k, v [S, D per kv head: K, S, D]; n real tokens.

    Returns (selected pages per selection head [Hs, P] bool, out [H, D])."""
    H, D = q.shape
    K, S, _ = k.shape
    G, P = H // K, -(-S // page)
    scores = np.full((H, P), -np.inf)
    for h in range(H):
        for p in range(P):
            toks = k[h // G, p * page:min((p + 1) * page, n)]
            if len(toks):
                scores[h, p] = np.maximum(q[h] * toks.max(0), q[h] * toks.min(0)).sum()
    if gqa != "query_head":
        grouped = scores.reshape(K, G, P)
        scores = grouped.max(1) if gqa == "max" else grouped.mean(1)
    selected = np.zeros(scores.shape, bool)
    for h in range(len(scores)):
        order = [p for p in np.argsort(-scores[h], kind="stable") if np.isfinite(scores[h, p])]
        last = (n - 1) // page
        if keep_last:
            order = [last] + [p for p in order if p != last]
        selected[h, order[:num_pages]] = True
    out = np.zeros((H, D))
    for h in range(H):
        sel = selected[h if gqa == "query_head" else h // G]
        toks = [t for t in range(n) if sel[t // page]]
        out[h] = np_attention(q[h:h + 1], k[h // G, toks], v[h // G, toks])[0]
    return selected, out


def _quest_inputs(B=2, S=40, K=2, H=4, D=8, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (B, 1, H, D)), jax.random.normal(kk, (B, S, K, D)),
            jax.random.normal(kv, (B, S, K, D)))


@pytest.mark.parametrize("gqa,keep_last", [("query_head", True), ("max", False),
                                           ("mean", True)])
def test_quest_matches_numpy_definition(gqa, keep_last):
    q, k, v = _quest_inputs()
    lengths = jnp.array([37, 22])
    run = jax.jit(quest_attention, static_argnames="policy")
    for impl in ("xla", "gather"):
        policy = Quest(token_budget=12, page_size=4, gqa=gqa, keep_last_page=keep_last,
                       impl=impl)
        out, pages = run(q, k, v, lengths, policy)
        num_pages = policy.num_pages(k.shape[1])
        assert num_pages == 3
        for b in range(2):
            want_pages, want = np_quest(np.asarray(q[b, 0], np.float64),
                                        np.asarray(k[b], np.float64).transpose(1, 0, 2),
                                        np.asarray(v[b], np.float64).transpose(1, 0, 2),
                                        int(lengths[b]), 4, num_pages, keep_last, gqa)
            np.testing.assert_array_equal(pages[b], want_pages)
            np.testing.assert_allclose(out[b, 0], want, rtol=1e-5, atol=1e-5)


def test_quest_page_bounds_incremental():
    _, k, _ = _quest_inputs()
    lengths = jnp.array([13, 6])
    bounds = jax.jit(page_bounds, static_argnums=2)
    update = jax.jit(update_page_bounds, static_argnums=4)
    kmin, kmax = bounds(k, lengths, 4)
    for t in range(5):
        kmin, kmax = update(kmin, kmax, k[jnp.arange(2), lengths + t], lengths + t, 4)
        want_min, want_max = bounds(k, lengths + t + 1, 4)
        np.testing.assert_array_equal(kmin, want_min)
        np.testing.assert_array_equal(kmax, want_max)


def test_quest_full_budget_and_dense_equal_full_attention():
    q, k, v = _quest_inputs(seed=1)
    lengths = jnp.array([40, 9])
    valid = (jnp.arange(40)[None] < lengths[:, None])[:, None, None, :]
    want = masked_attention(q, k, v, jnp.broadcast_to(valid, (2, 2, 1, 40)))
    for policy, dense in ((Quest(token_budget=40, page_size=8), False),
                          (Quest(token_budget=8, page_size=8, gqa="mean"), True),
                          (Quest(token_budget=8, page_size=8, impl="gather"), True)):
        out, pages = jax.jit(quest_attention, static_argnames="policy")(
            q, k, v, lengths, policy, dense=dense)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        assert bool(pages[0].all())


@pytest.mark.slow
def test_quest_pallas_interpret_matches_xla():
    q, k, v = _quest_inputs(S=128, D=8, seed=3)
    lengths = jnp.array([120, 50])
    run = jax.jit(quest_attention, static_argnames="policy")
    for gqa in ("max", "query_head"):  # one selection per KV head; one per query head (GQA 2)
        outs = [run(q, k, v, lengths, Quest(token_budget=48, page_size=16, gqa=gqa, impl=impl))
                for impl in ("xla", "pallas")]
        np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(outs[1][1], outs[0][1])
    # Per query head, the two query heads of KV head 0 chose different pages.
    assert bool((outs[0][1][:, 0] != outs[0][1][:, 1]).any())


def test_quest_validation():
    with pytest.raises(ValueError, match="gqa='sum'"):
        Quest(gqa="sum")
    with pytest.raises(ValueError, match="token_budget=0"):
        Quest(token_budget=0)
    with pytest.raises(ValueError, match="impl='triton'"):
        Quest(impl="triton")
    q, k, v = _quest_inputs()
    with pytest.raises(ValueError, match="q_len=2"):
        quest_attention(jnp.concatenate([q, q], 1), k, v, jnp.array([3, 3]), Quest())


# ----------------------------------------------------------------------------- DuoAttention


def np_duo_visible(retrieval, n_tokens, sink, recent, q_positions):
    """[K, T, S] visibility of DuoAttention's definition: retrieval heads causal, streaming heads
    the first `sink` tokens and the last `recent` ones up to the query."""
    q = np.asarray(q_positions)[:, None]
    k = np.arange(n_tokens)[None]
    causal = k <= q
    window = causal & ((k < sink) | (k > q - recent))
    return np.stack([causal if r else window for r in retrieval])


def np_masked_attention(q, k, v, vis):
    """q [T, H, D]; k, v [S, K, D]; vis [K, T, S] -> [T, H, D] (dense, float64)."""
    T, H, D = q.shape
    K = k.shape[1]
    out = np.zeros((T, H, D))
    for h in range(H):
        kv = h // (H // K)
        s = q[:, h] @ k[:, kv].T / np.sqrt(D)
        s = np.where(vis[kv], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
    return out


@pytest.mark.parametrize("scores", [[[0.9, 0.1, 0.7]], [[0.0, 0.2, 0.1]]])
def test_duo_matches_dense_with_per_head_masks(scores):
    B, T, K, H, D, sink, recent, steps = 2, 19, 3, 6, 8, 3, 5, 6
    policy = DuoAttention(head_scores=scores, sink_size=sink, recent_size=recent)
    heads = policy.layer_heads(0)
    retrieval = policy.retrieval[0]
    keys = jax.random.split(jax.random.key(3), 6)
    q, k, v = (jax.random.normal(kk, (B, T + steps, n, D)) for kk, n in zip(keys, (H, K, K)))
    lengths = np.array([19, 7])
    # Prefill attention: per-head masks over the real prompt tokens.
    out = jax.jit(duo_prefill_attention, static_argnames=("heads", "impl"))(
        q[:, :T], k[:, :T], v[:, :T], heads, impl="xla")
    for b in range(B):
        n = lengths[b]
        vis = np_duo_visible(retrieval, n, sink, recent, np.arange(n))
        want = np_masked_attention(np.asarray(q[b, :n], np.float64), np.asarray(k[b, :n]),
                                   np.asarray(v[b, :n]), vis)
        np.testing.assert_allclose(out[b, :n], want, rtol=1e-5, atol=1e-5)
    # Decoding: each row appends its next tokens (at its own position) and attends.
    state = jax.jit(duo_prefill, static_argnames=("heads", "capacity"))(
        heads, k[:, :T], v[:, :T], jnp.asarray(lengths), capacity=T + steps)
    append, attention = jax.jit(duo_append), jax.jit(duo_attention)
    rows = jnp.arange(B)
    for t in range(steps):
        pos = jnp.asarray(lengths + t)
        state = append(state, k[rows, pos], v[rows, pos])
        out = attention(q[rows, pos][:, None], state)
        for b in range(B):
            n = lengths[b] + t + 1
            vis = np_duo_visible(retrieval, n, sink, recent, [n - 1])
            want = np_masked_attention(np.asarray(q[b, n - 1:n], np.float64),
                                       np.asarray(k[b, :n]), np.asarray(v[b, :n]), vis)
            np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-5)
    # Separate storage: streaming heads hold sink + recent entries, not the context.
    Kr = int(retrieval.sum())
    assert state.full_k.shape == (B, Kr, T + steps, D)
    assert state.recent_k.shape == (B, K - Kr, recent, D)


def test_duo_pattern_rules():
    scores = [[0.1, 0.9], [0.5, 0.3]]
    np.testing.assert_array_equal(DuoAttention(head_scores=scores).retrieval,
                                  [[False, True], [True, False]])
    ratio = DuoAttention(head_scores=scores, threshold=None, head_compression_ratio=0.5)
    np.testing.assert_array_equal(ratio.retrieval, [[False, True], [True, False]])
    with pytest.raises(ValueError, match="exactly one"):
        DuoAttention(head_scores=scores, head_compression_ratio=0.5)
    with pytest.raises(ValueError, match="head_scores"):
        DuoAttention(head_scores=[0.1, 0.2])
    with pytest.raises(ValueError, match="recent_size=0"):
        DuoAttention(head_scores=scores, recent_size=0)


# ----------------------------------------------------------------------------- in a model

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48,
                  attention=AttentionConfig(impl="xla", block_q=8, block_k=8))
PROMPTS = jax.random.randint(jax.random.key(7), (2, 20), 0, 61)
LENGTHS = jnp.array([20, 11])


def _full_cache_logits(params, tokens_per_step):
    """Logits of a full (uncompressed) cache: the prefill logits, then one per fed token."""
    logits, cache = prefill(params, PROMPTS, CFG, lengths=LENGTHS, max_new_tokens=4)
    out = [logits]
    for tokens in tokens_per_step:
        logits, cache = decode_step(params, cache, tokens, CFG)
        out.append(logits)
    return out


def _policy_logits(params, policy, steps=3):
    """Greedy decoding through a policy cache: (logits per step, fed tokens, final cache)."""
    logits, cache = policy_prefill(params, PROMPTS, CFG, policy=policy, lengths=LENGTHS,
                                   max_new_tokens=4)
    out, fed = [logits], []
    for _ in range(steps):
        fed.append(jnp.argmax(out[-1], -1).astype(jnp.int32))
        logits, cache = policy_decode_step(params, cache, fed[-1], CFG)
        out.append(logits)
    return out, fed, cache


@jax.jit
def _kivi_seen_cache(cache):
    """A KVCache holding, for every token already cached, what KIVI's attention reads at the
    next step (keys below R * floor(n / R) and values below n - R dequantized)."""
    ks, vs = [], []
    for layer in range(CFG.num_layers):
        state = cache.layer(layer)
        B, K, _, D = state.k_residual.shape
        zeros = jnp.zeros((B, K, D), state.k_residual.dtype)
        k, v, _ = kivi_read(kivi_append(state, zeros, zeros))
        ks.append(k)
        vs.append(v)
    n = cache.next_pos
    C = cache.capacity
    keep = jnp.arange(C)[None, None] < n[:, None, None]  # [B, 1, C]
    pos = jnp.where(keep, jnp.arange(C)[None, None], -1)
    return KVCache(k=jnp.where(keep[None, ..., None], jnp.stack(ks), 0),
                   v=jnp.where(keep[None, ..., None], jnp.stack(vs), 0),
                   pos=jnp.broadcast_to(pos[None], (CFG.num_layers, 2, 2, C)).astype(jnp.int32),
                   length=jnp.broadcast_to(n[None, :, None], (CFG.num_layers, 2, 2)),
                   next_pos=n, score=None, step=jnp.zeros((), jnp.int32))


@pytest.mark.slow
def test_kivi_model_logits_are_those_of_the_dequantized_cache():
    params = init_params(CFG, jax.random.key(0))[0]
    policy = KIVI(bits=2, group_size=4, residual_length=8)
    logits, cache = policy_prefill(params, PROMPTS, CFG, policy=policy, lengths=LENGTHS,
                                   max_new_tokens=4)
    full = _full_cache_logits(params, [])
    np.testing.assert_allclose(logits, full[0], rtol=1e-5, atol=1e-5)  # prefill is exact
    fed = []
    for _ in range(3):
        fed.append(jnp.argmax(logits, -1).astype(jnp.int32))
        want, _ = decode_step(params, _kivi_seen_cache(cache), fed[-1], CFG)
        logits, cache = policy_decode_step(params, cache, fed[-1], CFG)
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    # The quantization is visible in the logits (the full cache gives other values).
    exact = _full_cache_logits(params, fed)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(exact[1:], [want])) > 1e-4


@pytest.mark.slow
def test_quest_in_model_full_budget_equals_full_cache_and_small_budget_differs():
    params = init_params(CFG, jax.random.key(1))[0]
    got, fed, _ = _policy_logits(params, Quest(token_budget=64, page_size=4, dense_layers=0))
    want = _full_cache_logits(params, fed)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # impl="gather" under the layer scan (dense first layer through lax.cond) agrees with xla.
    sparse = dict(token_budget=4, page_size=4, dense_layers=1)
    xla, fed_xla, _ = _policy_logits(params, Quest(**sparse))
    gathered, fed_gather, _ = _policy_logits(params, Quest(**sparse, impl="gather"))
    for a, b in zip(xla, gathered):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    sparse, _, _ = _policy_logits(params, Quest(token_budget=4, page_size=4, dense_layers=0,
                                                gqa="max"))
    want = _full_cache_logits(params, [jnp.argmax(x, -1).astype(jnp.int32) for x in sparse[:-1]])
    assert float(jnp.abs(sparse[-1] - want[-1]).max()) > 1e-4
    # dense_layers covering every layer reads every page again.
    dense, _, _ = _policy_logits(params, Quest(token_budget=4, page_size=4, dense_layers=2))
    for a, b in zip(dense, _full_cache_logits(params, fed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_duo_in_model_all_retrieval_equals_full_cache_and_streaming_saves_memory():
    params = init_params(CFG, jax.random.key(2))[0]
    got, fed, _ = _policy_logits(params, DuoAttention(head_scores=np.ones((2, 2)), sink_size=2,
                                                      recent_size=4))
    for a, b in zip(got, _full_cache_logits(params, fed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    mixed = DuoAttention(head_scores=[[1.0, 0.0], [0.0, 0.0]], sink_size=2, recent_size=4)
    logits, _, cache = _policy_logits(params, mixed)
    assert all(bool(jnp.isfinite(x).all()) for x in logits)
    _, full = prefill(params, PROMPTS, CFG, lengths=LENGTHS, max_new_tokens=4)
    # One retrieval head of four keeps the context; the others keep 2 + 4 entries.
    assert cache.nbytes() < 0.45 * full.nbytes()


def test_policy_cache_validation():
    params = init_params(CFG, jax.random.key(0))[0]
    with pytest.raises(ValueError, match="head_scores shape"):
        policy_prefill(params, PROMPTS, CFG, policy=DuoAttention(head_scores=np.ones((3, 2))))
    with pytest.raises(ValueError, match="group_size=32"):
        policy_prefill(params, PROMPTS, CFG, policy=KIVI())
    with pytest.raises(ValueError, match="policy="):
        policy_prefill(params, PROMPTS, CFG, policy="kivi")


@pytest.mark.slow
def test_core_entry_points_run_kivi_quest_and_duo():
    """prefill / decode_step / generate take the PolicyCache policies like any other."""
    from lcm.cache import generate, H2O
    params = init_params(CFG, jax.random.key(3))[0]
    full, _ = generate(params, CFG, PROMPTS, lengths=LENGTHS, max_new_tokens=4)
    exact = (Quest(token_budget=1024, page_size=4, dense_layers=0),
             DuoAttention(head_scores=np.ones((2, 2)), sink_size=2, recent_size=4))
    for policy in exact:  # full budget / all retrieval heads: the full cache's tokens
        got, n = generate(params, CFG, PROMPTS, lengths=LENGTHS, max_new_tokens=4, policy=policy)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(full))
    logits, cache = prefill(params, PROMPTS, CFG, lengths=LENGTHS, policy=KIVI(bits=2, group_size=8,
                                                                               residual_length=8),
                            max_new_tokens=2)
    logits, cache = decode_step(params, cache, jnp.argmax(logits, -1), CFG)
    assert bool(jnp.isfinite(logits).all())
    with pytest.raises(ValueError, match="decode policies need a KVCache"):
        decode_step(params, cache, jnp.argmax(logits, -1), CFG, policy=H2O(hh_size=4,
                                                                           recent_size=4))
    with pytest.raises(ValueError, match="needs a KVCache"):
        generate(params, CFG, PROMPTS, lengths=LENGTHS, max_new_tokens=4, policy=exact[0],
                 decode_policy=H2O(hh_size=4, recent_size=4))
