"""KV cache, prefill / decode / generate, and cache eviction policies.

    logits, cache = prefill(params, tokens, cfg, lengths=lengths, max_new_tokens=16)
    logits, cache = decode_step(params, cache, next_tokens, cfg)
    tokens, num_generated = generate(params, cfg, prompts, lengths=lengths, max_new_tokens=32)

`KVCache` is a pytree (see `lcm.cache.kv`): static capacity, per-(layer, batch, kv-head)
lengths, original positions of every kept entry, optional per-entry scores.
"""

from lcm.cache.generate import generate, sample_logits
from lcm.cache.kv import KVCache
from lcm.cache.prefill import decode_step, prefill

__all__ = ["KVCache", "prefill", "decode_step", "generate", "sample_logits"]
