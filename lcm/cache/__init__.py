"""KV cache, prefill / decode / generate, and cache eviction policies::

    logits, cache = prefill(params, tokens, cfg, lengths=lengths, policy=SnapKV(0.5),
                            max_new_tokens=16)
    logits, cache = decode_step(params, cache, next_tokens, cfg)
    tokens, num_generated = generate(params, cfg, prompts, lengths=lengths, max_new_tokens=32,
                                     policy=SnapKV(0.5))

`KVCache` is a pytree (see `lcm.cache.kv`): static capacity, per-(layer, batch, kv-head)
lengths, original positions of every kept entry, optional per-entry scores. PyramidKV's cache
has a capacity per layer and AdaKV's heads share one pool per layer, so their bytes are the
sum of their budgets (`lcm.cache.layouts`; `layout="uniform"` for decode-time policies).
`KIVI(bits=2, evict=SnapKV(0.5))` quantizes what an eviction policy keeps. Policies are
frozen dataclasses with kvpress's names and defaults, one module each under
`lcm.cache.presses` (listed in `PRESSES`), run as observe -> score -> select(static budget) ->
store (`lcm.cache.compress`). One prefill can be compressed
by several policies: `prefill_observed` then `compress`. While decoding, `decode_step(...,
policy=...)` / `generate(..., decode_policy=...)` compress every few steps (`Decoding`, kvpress's
DecodingPress) or at every step (`H2O`, `TOVA(budget=n)`, `StreamingLLM(budget=n)`); see
`lcm.cache.decoding`. Self-Extend / ReRoPE models decode from `lcm.cache.extended` (keys kept
un-rotated, `ExtendedCache`), with the same prefill / decode_step / generate signatures.
"""

from lcm.cache.compress import Observations, compress, is_prefill_press
from lcm.cache.extend import extend
from lcm.cache.formats import PolicyCache as PolicyCache
from lcm.cache.generate import generate, sample_logits
from lcm.cache.speculative import Speculative
from lcm.cache.kv import KVCache
from lcm.cache.prefill import decode_step, prefill, prefill_observed
from lcm.cache.presses import *  # noqa: F403  (every registered press, PRESSES, Press, ...)
from lcm.cache.presses import __all__ as _presses
from lcm.cache.presses import press_from_name
from lcm.cache import extended as extended
from lcm.cache.extended import ExtendedCache as ExtendedCache

# The configs' name for press_from_name.
policy_from_name = press_from_name

__all__ = ["KVCache", "prefill", "prefill_observed", "decode_step", "extend", "generate",
           "Speculative", "sample_logits", "compress", "Observations", "is_prefill_press",
           "policy_from_name", "PolicyCache", "ExtendedCache", *_presses]
