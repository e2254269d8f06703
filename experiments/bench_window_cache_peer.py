"""The peer of experiments/bench_window_cache.py: the same Gemma-3-shaped checkpoint in
transformers' Gemma3ForCausalLM (float32, CPU) with its own cache, timed the same way. Runs in
the side environment with torch:

    .side/torch-venv/bin/python experiments/bench_window_cache_peer.py --checkpoint DIR \
        --lengths 4096,16384 --decode_tokens 16 --repeats 2 [--threads N]

Prompts are the same token ids as lcm's (NumPy default_rng(length) over the vocabulary).
Prefill: one forward over the prompt keeping the last position's logits, with the cache.
Decode: greedy next-token steps from that cache, one call per token. The cache's bytes are the
tensors its layers hold after the decode. Prints one JSON object per line: {"impl", "length",
"cache_bytes", "prefill_s", "decode_s_per_token"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def prompt_ids(length: int, vocab_size: int) -> np.ndarray:
    return np.random.default_rng(length).integers(0, vocab_size, length).astype(np.int64)


def cache_bytes(cache) -> int:
    import torch

    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--lengths", required=True)
    parser.add_argument("--decode_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import Gemma3ForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    model = Gemma3ForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    print(json.dumps({"impl": "transformers", "transformers": transformers.__version__,
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "attn_implementation": model.config._attn_implementation}), flush=True)
    for length in [int(x) for x in args.lengths.split(",")]:
        ids = torch.from_numpy(prompt_ids(length, model.config.vocab_size))[None]
        prefill, decode, nbytes = [], [], 0
        with torch.inference_mode():
            for _ in range(args.repeats + 1):  # the first run warms up
                start = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1)
                prefill.append(time.perf_counter() - start)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                start = time.perf_counter()
                for _ in range(args.decode_tokens):
                    out = model(token, past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                decode.append((time.perf_counter() - start) / args.decode_tokens)
                nbytes = cache_bytes(cache)
        print(json.dumps({"impl": "transformers", "length": length, "cache_bytes": nbytes,
                          "prefill_s": statistics.median(prefill[1:]),
                          "decode_s_per_token": statistics.median(decode[1:])}), flush=True)


if __name__ == "__main__":
    main()
