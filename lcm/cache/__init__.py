"""KV cache, prefill / decode / generate, and cache eviction policies.

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
frozen dataclasses with kvpress's names and defaults (`lcm.cache.policies`), run as
score -> select(static budget) -> apply (`lcm.cache.compress`). One prefill can be compressed
by several policies: `prefill_observed` then `compress`. While decoding, `decode_step(...,
policy=...)` / `generate(..., decode_policy=...)` compress every few steps (`Decoding`, kvpress's
DecodingPress) or at every step (`H2O`, `TOVA(budget=n)`, `StreamingLLM(budget=n)`); see
`lcm.cache.decoding`. Self-Extend / ReRoPE models decode from `lcm.cache.extended` (keys kept
un-rotated, `ExtendedCache`), with the same prefill / decode_step / generate signatures.
"""

from lcm.cache.compress import Observations, compress
from lcm.cache.duo import DuoAttention as DuoAttention
from lcm.cache.formats import PolicyCache as PolicyCache
from lcm.cache.generate import generate, sample_logits
from lcm.cache.kivi import KIVI as KIVI
from lcm.cache.kv import KVCache
from lcm.cache.policies import (H2O, TOVA, AdaKV, Decoding, ExpectedAttention, Knorm, Merging,
                                ObservedAttention, PyramidKV, SnapKV, StreamingLLM,
                                policy_from_name)
from lcm.cache.prefill import decode_step, prefill, prefill_observed
from lcm.cache.quest import Quest as Quest
from lcm.cache import extended as extended
from lcm.cache.extended import ExtendedCache as ExtendedCache

__all__ = ["KVCache", "prefill", "prefill_observed", "decode_step", "generate", "sample_logits",
           "compress", "Observations", "policy_from_name", "Knorm", "StreamingLLM", "SnapKV",
           "PyramidKV", "TOVA", "ObservedAttention", "ExpectedAttention", "H2O", "AdaKV",
           "Merging", "Decoding"]
