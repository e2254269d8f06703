"""Compiled memory of `prefill` without and with `prefill_chunk` (XLA's memory analysis of the
jitted program; nothing is allocated or run).

For each prompt length and chunk size (0: the one-shot prefill), the program that returns the
last position's logits and the full KV cache (no press, no room) is compiled for the default
backend at SmolLM2-135M's shapes, batch 1, float32. Reported: the cache's bytes (the output
every variant must hold), temporaries (activations, attention blocks, the scan's buffers) and
the peak estimate arguments + outputs + temporaries. Chunked prefill's temporaries should stay
flat in the prompt length (one chunk's activations), the one-shot prefill's grow with it.

    python -m experiments.run --config=configs/bench_chunked_prefill.py \\
        --workdir=/tmp/bench_chunked_prefill
"""

from __future__ import annotations

import datetime
import os

import jax
import jax.numpy as jnp

from experiments.workdir import write_summary
from lcm.config import AttentionConfig, ModelConfig
from lcm.model import param_shapes

GIB = 2 ** 30


def measure(cfg: ModelConfig, length: int, chunk: int) -> dict:
    from lcm.cache.chunked import chunked_prefill_jit
    from lcm.cache.prefill import prefill_jit

    params = param_shapes(cfg)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    if chunk:
        compiled = chunked_prefill_jit.lower(
            params, tokens, lengths, cfg=cfg, policy=None, chunk=chunk, room=0,
            all_logits=False, layout="compact", full_rows=True).compile()
    else:
        compiled = prefill_jit.lower(params, tokens, lengths, cfg=cfg, policy=None,
                                     chunk=cfg.attention.block_q, room=0, all_logits=False,
                                     layout="compact", full_rows=True).compile()
    stats = compiled.memory_analysis()
    return {"length": length, "chunk": chunk,
            "cache_gib": 2 * cfg.num_layers * cfg.num_kv_heads * length * cfg.head_dim * 4 / GIB,
            "temp_gib": stats.temp_size_in_bytes / GIB,
            "peak_gib": (stats.argument_size_in_bytes + stats.output_size_in_bytes
                         + stats.temp_size_in_bytes - stats.alias_size_in_bytes) / GIB}


def run(config, workdir: str) -> dict:
    m = config.model
    lengths, chunks = [int(x) for x in config.lengths], [int(c) for c in config.chunks]
    if not lengths or min(lengths) < 1 or min(chunks) < 0:
        raise ValueError(f"config.lengths={lengths}, config.chunks={chunks}; expected positive "
                         f"lengths and chunks >= 0 (0: one-shot)")
    cfg = ModelConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                      num_layers=m.num_layers, num_heads=m.num_heads,
                      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                      intermediate_size=m.intermediate_size, tie_embeddings=True,
                      max_position_embeddings=max(lengths),
                      attention=AttentionConfig(impl="xla", block_q=m.block, block_k=m.block))
    header = (f"{jax.default_backend()} compiled memory (XLA estimate), jax {jax.__version__}, "
              f"{os.cpu_count()} CPUs, {datetime.date.today().isoformat()}; model "
              f"{m.num_layers} layers x {m.hidden_size}, {m.num_heads}/{m.num_kv_heads} heads "
              f"x {m.head_dim}, float32, batch 1, full cache, no room")
    print(header, flush=True)
    rows = []
    for length in lengths:
        for chunk in chunks:
            rows.append(measure(cfg, length, chunk))
            print(rows[-1], flush=True)
    lines = [header, "", "| prompt | prefill | KV cache GiB | temporaries GiB | peak GiB |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        name = f"prefill_chunk={r['chunk']}" if r["chunk"] else "one-shot"
        lines.append(f"| {r['length']} | {name} | {r['cache_gib']:.2f} | {r['temp_gib']:.2f} | "
                     f"{r['peak_gib']:.2f} |")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return write_summary(workdir, {"header": header, "rows": rows}, markdown=text)
