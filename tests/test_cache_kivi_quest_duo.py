"""KIVI, Quest and DuoAttention against NumPy implementations of their papers' definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm.cache.kivi import (KIVI, kivi_append, kivi_attention, kivi_prefill, kivi_read,
                            pack_codes, unpack_codes)

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
