"""The peer of experiments/bench_model.py: SmolLM2-135M from the same GGUF file in transformers
(float32, CPU), prefill and decode timed the same way. Runs in the side environment with torch:

    .side/torch-venv/bin/python experiments/bench_model_peer.py --gguf PATH --lengths 1024,2048 \
        --decode_tokens 32 --repeats 2 [--llama_cpp] [--threads N]

Prompts are the same token ids as lcm's (NumPy default_rng(length) over the vocabulary).
Prefill: one forward over the prompt keeping only the last position's logits (as lcm's
prefill), with the KV cache. Decode: greedy next-token steps from that cache, one call per
token. Prints one JSON object per line: {"impl", "length", "prefill_s", "decode_s_per_token"}.
With --llama_cpp also times llama-cpp-python on the same (Q4_1) file, if it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def prompt_ids(length: int, vocab_size: int) -> np.ndarray:
    return np.random.default_rng(length).integers(0, vocab_size, length).astype(np.int64)


def bench_transformers(path, lengths, decode_tokens, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    header = {"impl": "transformers", "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "attn_implementation": model.config._attn_implementation}
    print(json.dumps(header), flush=True)
    for length in lengths:
        ids = torch.from_numpy(prompt_ids(length, vocab))[None]
        prefill, decode = [], []
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first run warms up
                start = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1)
                prefill.append(time.perf_counter() - start)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                start = time.perf_counter()
                for _ in range(decode_tokens):
                    out = model(token, past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                decode.append((time.perf_counter() - start) / decode_tokens)
        print(json.dumps({"impl": "transformers", "length": length,
                          "prefill_s": statistics.median(prefill[1:]),
                          "decode_s_per_token": statistics.median(decode[1:])}), flush=True)


def bench_llama_cpp(path, lengths, decode_tokens, repeats):
    try:
        from llama_cpp import Llama
    except ImportError:
        print(json.dumps({"impl": "llama_cpp", "error": "llama-cpp-python is not installed"}))
        return
    llm = Llama(model_path=path, n_ctx=max(lengths) + decode_tokens + 8, verbose=False,
                n_batch=512, logits_all=False)
    vocab = llm.n_vocab()
    for length in lengths:
        ids = prompt_ids(length, vocab).tolist()
        prefill, decode = [], []
        for _ in range(repeats + 1):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            prefill.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(decode_tokens):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                llm.eval([token])
            decode.append((time.perf_counter() - start) / decode_tokens)
        print(json.dumps({"impl": "llama_cpp", "length": length,
                          "prefill_s": statistics.median(prefill[1:]),
                          "decode_s_per_token": statistics.median(decode[1:])}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--decode_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--llama_cpp", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    bench_transformers(args.gguf, lengths, args.decode_tokens, args.repeats)
    if args.llama_cpp:
        bench_llama_cpp(args.gguf, lengths, args.decode_tokens, args.repeats)


if __name__ == "__main__":
    main()
