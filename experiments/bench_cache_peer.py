"""The peer of experiments/bench_cache.py: transformers + kvpress decode tokens/s and cache bytes.

Runs in a side environment pinned as kvpress 0.5.5 wants it (CPU torch 2.13, transformers
5.2.0, kvpress 0.5.5; no lcm import, no download): a random LlamaForCausalLM of bench_cache's
default shape (4 layers, 8 heads / 4 kv heads x 64, hidden 256, vocab 2048, float32, batch 1,
sdpa). For each context it prefills the prompt inside `with press(model)` into a DynamicCache
(as kvpress's pipeline does, through `model.model`), then times greedy decode steps with
`model(...)` after two warm-up steps. Presses at the same budget as bench_cache:
StreamingLLMPress, SnapKVPress and AdaKVPress(SnapKVPress) at compression_ratio =
1 - budget / context, and DuoAttentionPress with the same random head scores rule
(head_compression_ratio; 64 sinks + budget - 64 recent) set locally instead of downloaded.
kvpress has no Quest; HF's quantized cache needs quanto/hqq (not installed), so KIVI has no
peer here.

    .side/kvpress-venv/bin/python experiments/bench_cache_peer.py --contexts 1024,2048,4096

(kvpress 0.5.5's hooks read the `cache_position` kwarg, which newer transformers no longer pass
to attention layers: use transformers 5.2.0.)

kvpress imports `datasets` only for DuoAttention's on-the-fly scoring; when it is not
installed a stub module stands in (that path is never used here).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import types

import numpy as np
import torch

try:
    import datasets  # noqa: F401
except ImportError:
    _stub = types.ModuleType("datasets")

    def _no_datasets(*args, **kwargs):
        raise RuntimeError("datasets is not installed (stubbed by bench_cache_peer)")
    _stub.load_dataset = _no_datasets
    sys.modules["datasets"] = _stub

import transformers  # noqa: E402
from kvpress import AdaKVPress, DuoAttentionPress, SnapKVPress, StreamingLLMPress  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

DUO_SINKS = 64


class LocalDuoAttentionPress(DuoAttentionPress):
    """DuoAttentionPress with head scores given here (kvpress downloads them by model name)."""

    def __init__(self, head_scores, head_compression_ratio, sink_size, recent_size):
        super().__init__(head_compression_ratio=head_compression_ratio)
        self._scores, self._sizes = np.asarray(head_scores), (sink_size, recent_size)

    def post_init_from_model(self, model):
        self.sink_size, self.recent_size = self._sizes
        n_pruned = round(self._scores.size * self.head_compression_ratio)
        self.streaming_mask = torch.zeros(self._scores.shape, dtype=torch.bool)
        if n_pruned > 0:
            idx = np.argsort(self._scores, axis=None, kind="stable")[:n_pruned]
            self.streaming_mask[np.unravel_index(idx, self._scores.shape)] = True


def make_press(name, budget, context, layers, kv_heads, duo_ratio):
    ratio = 1 - budget / context
    if name == "full":
        return None
    if name == "streaming_llm":
        return StreamingLLMPress(compression_ratio=ratio)
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio)
    if name == "adakv":
        return AdaKVPress(SnapKVPress(compression_ratio=ratio))
    if name == "duo":
        scores = np.random.default_rng(0).uniform(size=(layers, kv_heads))
        return LocalDuoAttentionPress(scores, duo_ratio, DUO_SINKS, budget - DUO_SINKS)
    raise ValueError(f"press {name!r}; expected full, streaming_llm, snapkv, adakv or duo")


@torch.no_grad()
def measure(model, ids, press, steps, repeats):
    """(cache bytes after prefill, seconds per decode step: min over repeats)."""
    times, nbytes = [], None
    for _ in range(repeats):
        cache = DynamicCache()
        with press(model) if press is not None else contextlib.nullcontext():
            hidden = model.model(input_ids=ids, past_key_values=cache).last_hidden_state
        nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        token = model.lm_head(hidden[:, -1:]).argmax(-1)
        position = ids.shape[1]
        for i in range(steps + 2):
            if i == 2:
                start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache,
                        position_ids=torch.tensor([[position]]))
            token, position = out.logits[:, -1:].argmax(-1), position + 1
        times.append((time.perf_counter() - start) / steps)
    return nbytes, min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="1024,2048,4096")
    parser.add_argument("--presses", default="full,streaming_llm,snapkv,adakv,duo")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--decode_steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duo_ratio", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (on a busy 2-core machine 2 threads made "
                             "each decode step ~10x slower than 1: OpenMP workers spin)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=64, max_position_embeddings=1 << 20, rms_norm_eps=1e-6,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    names = args.presses.split(",")
    names = ["full"] + [n for n in names if n != "full"]  # the ratios' base
    import kvpress
    print(f"peer: torch {torch.__version__} ({torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs), transformers {transformers.__version__}, kvpress "
          f"{getattr(kvpress, '__version__', '0.5.5')}; budget {args.budget}, "
          f"{args.decode_steps} decode steps, min of {args.repeats}", flush=True)
    print("| context | press | cache MiB | bytes vs full | decode tok/s | speed vs full |")
    print("|---:|---|---:|---:|---:|---:|", flush=True)
    for context in [int(c) for c in args.contexts.split(",")]:
        ids = torch.randint(0, config.vocab_size, (1, context),
                            generator=torch.Generator().manual_seed(context))
        full = None
        for name in names:
            press = make_press(name, args.budget, context, config.num_hidden_layers,
                               config.num_key_value_heads, args.duo_ratio)
            nbytes, seconds = measure(model, ids, press, args.decode_steps, args.repeats)
            if name == "full":
                full = (nbytes, seconds)
            print(f"| {context} | {name} | {nbytes / 2**20:.2f} | {nbytes / full[0]:.3f} | "
                  f"{1 / seconds:.1f} | {full[1] / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
