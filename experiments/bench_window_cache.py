"""Benchmarks the KV cache of a Gemma-3-shaped model (sliding layers keep their window, the
global layers every token): cache bytes and decode speed, lcm vs transformers, in one run.

1. Analytic cache bytes of the full-size Gemma 3 models (1B, 4B, 12B, 27B: their layers, kv
   heads, head_dim and windows; bfloat16) at 8k / 32k / 128k tokens: lcm's layered cache
   (window slots in sliding layers) against keeping every token in every layer, per sequence.
2. A small Gemma-3-shaped model (config fields; random weights, float32), written once as a
   transformers checkpoint so that both sides run the same weights: for each prompt length,
   lcm's measured cache bytes (`KVCache.nbytes()`, including room for the decoded tokens),
   the full cache's (`layout="uniform"`: every layer holds every token), prefill seconds and
   decode tokens/s (median of `repeats` runs after a warm-up), then the same for
   `Gemma3ForCausalLM` with its own cache (experiments/bench_window_cache_peer.py in the side
   environment: its cache bytes are the tensors of its past_key_values).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.workdir import run_peer, write_summary

# Gemma 3's published shapes: (layers, kv heads, head_dim, window, global every n-th layer).
GEMMA3 = {"1B": (26, 1, 256, 512, 6), "4B": (34, 4, 256, 1024, 6),
          "12B": (48, 8, 256, 1024, 6), "27B": (62, 16, 128, 1024, 6)}


def analytic_bytes(layers, kv_heads, head_dim, window, every, length, itemsize=2):
    """(layered, every token) cache bytes of one sequence: K and V in `itemsize`-byte floats
    plus lcm's int32 position per entry; sliding layers hold min(window, length) entries."""
    per_entry = kv_heads * (2 * head_dim * itemsize + 4)
    full_layers = sum(1 for i in range(layers) if (i + 1) % every == 0)
    sliding = layers - full_layers
    return (per_entry * (full_layers * length + sliding * min(window, length)),
            per_entry * layers * length)


def model_config(config):
    from lcm.config import AttentionConfig, ModelConfig, RopeConfig

    types = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                  for i in range(config.num_layers))
    return ModelConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_layers=config.num_layers, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
        intermediate_size=config.intermediate_size, layer_types=types,
        sliding_window=config.sliding_window, max_position_embeddings=131072,
        rope=RopeConfig(theta=1e6, rope_type="linear", factor=8.0),
        sliding_rope=RopeConfig(theta=1e4), qk_norm="rms", query_pre_attn_scalar=256.0,
        post_norms=True, norm_weight_offset=1.0, mlp_activation="gelu_tanh", embed_scale=True,
        tie_embeddings=True, architecture="gemma3",
        attention=AttentionConfig(impl="xla", block_q=config.block, block_k=config.block))


def prompt_ids(length: int, vocab_size: int) -> np.ndarray:
    """The prompt both sides time: NumPy default_rng(length) token ids."""
    return np.random.default_rng(length).integers(0, vocab_size, length).astype(np.int32)


def bench_lcm(cfg, params, lengths, decode_tokens: int, repeats: int) -> list[dict]:
    from lcm.cache import decode_step, prefill

    def step(params, cache, token):
        logits, cache = decode_step(params, cache, token, cfg)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    run_decode = jax.jit(step, donate_argnums=1)
    rows = []
    for length in lengths:
        tokens = jnp.asarray(prompt_ids(length, cfg.vocab_size))[None]
        full = jax.eval_shape(lambda p, t: prefill(p, t, cfg, max_new_tokens=decode_tokens,
                                                   layout="uniform")[1], params, tokens)
        full_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(full))
        run_prefill = jax.jit(lambda p, t: prefill(p, t, cfg, max_new_tokens=decode_tokens))
        times_prefill, times_decode, nbytes = [], [], 0
        for _ in range(repeats + 1):  # the first run compiles and warms up
            start = time.perf_counter()
            logits, cache = jax.block_until_ready(run_prefill(params, tokens))
            times_prefill.append(time.perf_counter() - start)
            nbytes = cache.nbytes()
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            start = time.perf_counter()
            for _ in range(decode_tokens):
                token, cache = run_decode(params, cache, token)
            jax.block_until_ready(token)
            times_decode.append((time.perf_counter() - start) / decode_tokens)
        rows.append({"impl": "lcm", "length": length, "cache_bytes": nbytes,
                     "full_cache_bytes": full_bytes,
                     "prefill_s": statistics.median(times_prefill[1:]),
                     "decode_s_per_token": statistics.median(times_decode[1:])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_peer(config, checkpoint: str) -> tuple[list[dict], list[dict]]:
    """Runs the peer script; returns (rows, header lines)."""
    args = ["--checkpoint", checkpoint, "--lengths", ",".join(str(x) for x in config.lengths),
            "--decode_tokens", str(config.decode_tokens), "--repeats", str(config.repeats)]
    if config.peer_threads:
        args += ["--threads", str(config.peer_threads)]
    return run_peer(config.peer_python, "bench_window_cache_peer.py", args)


def analytic_table() -> str:
    lines = ["| model | context | lcm layered cache | every token, every layer | ratio |",
             "|---|---:|---:|---:|---:|"]
    for name, shape in GEMMA3.items():
        for length in (8192, 32768, 131072):
            ours, full = analytic_bytes(*shape, length)
            lines.append(f"| Gemma 3 {name} | {length // 1024}k | {ours / 2**20:,.0f} MiB | "
                         f"{full / 2**20:,.0f} MiB | {ours / full:.3f} |")
    return "\n".join(lines)


def measured_table(rows, lengths) -> str:
    by = {(r["impl"], r["length"]): r for r in rows}
    lines = ["| prompt | lcm cache | lcm full cache | transformers cache | lcm ÷ transformers "
             "bytes | lcm decode tok/s | transformers decode tok/s | lcm ÷ transformers decode "
             "| lcm prefill s | transformers prefill s |", "|" + "---:|" * 10]
    for length in lengths:
        ours, peer = by.get(("lcm", length)), by.get(("transformers", length))

        def mib(x):
            return f"{x / 2**20:,.2f} MiB"

        cells = [str(length), mib(ours["cache_bytes"]), mib(ours["full_cache_bytes"])]
        if peer:
            cells += [mib(peer["cache_bytes"]),
                      f"{ours['cache_bytes'] / peer['cache_bytes']:.2f}×"]
        else:
            cells += ["-", "-"]
        cells.append(f"{1 / ours['decode_s_per_token']:,.1f}")
        if peer:
            cells += [f"{1 / peer['decode_s_per_token']:,.1f}",
                      f"{peer['decode_s_per_token'] / ours['decode_s_per_token']:.2f}×"]
        else:
            cells += ["-", "-"]
        cells += [f"{ours['prefill_s']:.2f}", f"{peer['prefill_s']:.2f}" if peer else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(config, workdir: str) -> dict:
    from lcm.io import save_hf_checkpoint
    from lcm.model import init_params

    lengths = [int(x) for x in config.lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"config.lengths={config.lengths!r}; expected positive prompt lengths")
    cfg = model_config(config)
    params, _ = init_params(cfg, jax.random.key(0))
    # Gemma's norms scale by 1 + w, and init_params starts w at 0: move them off it.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    params = jax.tree_util.tree_unflatten(treedef, [
        x + 0.1 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
        if path[-1].key.endswith("norm") else x for i, (path, x) in enumerate(leaves)])
    checkpoint = os.path.join(workdir, "gemma3_small")
    save_hf_checkpoint(checkpoint, cfg, params, overwrite=True)
    header = (f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
              f"load avg {'/'.join(f'{x:.1f}' for x in os.getloadavg())}, jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}; a Gemma-3-shaped model ({cfg.num_layers} "
              f"layers, 5 sliding (window {cfg.sliding_window}) per global one, hidden "
              f"{cfg.hidden_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv head of "
              f"{cfg.head_dim}; random weights, float32), batch 1, greedy decode of "
              f"{config.decode_tokens} tokens; median of {config.repeats} runs after a warm-up")
    print(header, flush=True)
    rows = bench_lcm(cfg, params, lengths, config.decode_tokens, config.repeats)
    peer_info = []
    if config.peer_python:
        peer_rows, peer_info = bench_peer(config, checkpoint)
        rows += peer_rows
        for info in peer_info:
            print(json.dumps(info), flush=True)
    text = (f"Full-size Gemma 3, analytic (bfloat16, one sequence):\n\n{analytic_table()}\n\n"
            f"Measured on the small model:\n\n{measured_table(rows, lengths)}")
    print("\n" + text, flush=True)
    return write_summary(workdir, {"machine": header, "rows": rows, "peer": peer_info,
                                   "python": sys.version.split()[0]},
                         markdown=f"{header}\n\n{text}")


if __name__ == "__main__":
    from experiments.run import entry_point

    entry_point(default_experiment="bench_window_cache")
