"""Passkey recall across segments: which memory kinds carry a fact further than one segment.

Each example is `num_segments` segments of `segment_len` tokens of random filler. One passkey
(one of `num_passkeys` tokens that never occur as filler) sits at a random place in the segment
`distance` segments before the last; the last token is a query marker, and the model must name
the passkey there. Distance 0 puts the passkey in the query's own segment. The same small
decoder is trained from the same initialisation with each memory kind (optax AdamW, loss on the
query position only, full backpropagation through the segments unless `bptt_segments` is set),
then evaluated on fresh examples at every distance. Chance is 1 / num_passkeys.

Writes `memory_recall.csv` (memory, distance, accuracy, ...), `memory_recall.png` (accuracy vs
distance), `results.md` and `summary.json` to the workdir.
"""

from __future__ import annotations

import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.workdir import write_summary
from lcm.checks import check_int, check_number
from lcm.config import AttentionConfig, ModelConfig
from lcm.memory import (CompressiveMemory, KNNMemory, LinearRecurrence, RecurrentMemory,
                        TransformerXL, init_memory_params, run_segments)
from lcm.model import init_params

MEMORIES = ("none", "xl", "rmt", "infini", "knn", "linear")
_TITLES = {"none": "no memory", "xl": "Transformer-XL", "rmt": "RMT", "infini": "Infini-attention",
           "knn": "kNN (Memorizing)", "linear": "gated linear recurrence"}


def make_memory(name: str, config):
    """The memory kind called `name` with the config's sizes (None for no memory)."""
    total = config.num_segments * config.segment_len
    return {
        "none": lambda: None,
        "xl": lambda: TransformerXL(mem_len=config.xl_mem_len or config.segment_len),
        "rmt": lambda: RecurrentMemory(num_mem_tokens=config.rmt_mem_tokens),
        "infini": lambda: CompressiveMemory(),
        "knn": lambda: KNNMemory(capacity=total, k=config.knn_k),
        "linear": lambda: LinearRecurrence(chunk_size=config.segment_len),
    }[name]()


def model_config(config) -> ModelConfig:
    heads = config.num_heads
    return ModelConfig(
        vocab_size=config.num_fillers + config.num_passkeys + 1, hidden_size=config.hidden_size,
        num_layers=config.num_layers, num_heads=heads, num_kv_heads=heads,
        head_dim=config.hidden_size // heads, intermediate_size=2 * config.hidden_size,
        attention=AttentionConfig(impl="xla", block_q=config.segment_len,
                                  block_k=config.segment_len))


def make_batch(config, seed: int, batch: int, distance=None):
    """(tokens [B, T] int32, passkey [B] int32, distance [B] int32): a pure function of seed."""
    rng = np.random.default_rng(seed)
    N, S, F, P = config.num_segments, config.segment_len, config.num_fillers, config.num_passkeys
    tokens = rng.integers(0, F, size=(batch, N * S), dtype=np.int32)
    if distance is None:
        distance = rng.integers(0, N, size=batch)
    distance = np.broadcast_to(np.asarray(distance, np.int32), (batch,))
    segment = N - 1 - distance
    # In the last segment the passkey must come before the query marker (the last token).
    offset = rng.integers(0, np.where(distance == 0, S - 1, S))
    passkey = rng.integers(0, P, size=batch, dtype=np.int32)
    tokens[np.arange(batch), segment * S + offset] = F + passkey
    tokens[:, -1] = F + P  # the query marker
    return jnp.asarray(tokens), jnp.asarray(passkey), jnp.asarray(distance)


def _train_and_eval(name, config, cfg, params0, key):
    memory = make_memory(name, config)
    mparams = init_memory_params(memory, cfg, key)[0] if memory is not None else None
    theta = {"model": params0, "memory": mparams}
    num_params = sum(x.size for x in jax.tree.leaves(theta))
    F = config.num_fillers
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, min(config.warmup_steps,
                                                                       config.steps - 1),
                                           config.steps, config.learning_rate * 0.1),
        weight_decay=0.01))

    def query_logits(theta, tokens):
        logits, _ = run_segments(theta["model"], tokens, cfg, memory=memory,
                                 segment_len=config.segment_len, memory_params=theta["memory"],
                                 bptt_segments=config.bptt_segments or None)
        # Only the passkey tokens can be the answer.
        return logits[:, -1, F:F + config.num_passkeys]

    @jax.jit
    def train_step(theta, opt_state, tokens, passkey):
        def loss_fn(theta):
            logits = query_logits(theta, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, passkey).mean()

        loss, grads = jax.value_and_grad(loss_fn)(theta)
        updates, opt_state = opt.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, loss

    predict = jax.jit(lambda theta, tokens: jnp.argmax(query_logits(theta, tokens), -1))
    opt_state = opt.init(theta)
    start, losses = time.perf_counter(), []
    for step in range(config.steps):
        tokens, passkey, _ = make_batch(config, config.seed * 1_000_003 + step, config.batch_size)
        theta, opt_state, loss = train_step(theta, opt_state, tokens, passkey)
        losses.append(float(loss))
    train_seconds = time.perf_counter() - start
    accuracy = []
    for d in range(config.num_segments):
        tokens, passkey, _ = make_batch(config, 10**9 + 1000 * config.seed + d,
                                        config.eval_examples, distance=d)
        accuracy.append(float(jnp.mean(predict(theta, tokens) == passkey)))
    tail = losses[-max(1, config.steps // 10):]
    return {"memory": name, "params": int(num_params), "train_seconds": train_seconds,
            "final_loss": float(np.mean(tail)), "accuracy": accuracy}


def check_config(config) -> None:
    """Sizes, steps and the learning rate, checked before any model is built."""
    for name, minimum in (("seed", 0), ("num_segments", 1), ("segment_len", 1),
                          ("num_fillers", 1), ("num_passkeys", 2), ("hidden_size", 1),
                          ("num_layers", 1), ("num_heads", 1), ("steps", 1),
                          ("warmup_steps", 0), ("batch_size", 1), ("xl_mem_len", 0),
                          ("rmt_mem_tokens", 0), ("knn_k", 1), ("bptt_segments", 0),
                          ("eval_examples", 1)):
        check_int("config", name, config[name], minimum)
    check_number("config", "learning_rate", config.learning_rate, 0, lo_open=True)


def run(config, workdir: str) -> dict:
    check_config(config)
    names = [n.strip() for n in config.memories.split(",") if n.strip()]
    if bad := [n for n in names if n not in MEMORIES]:
        raise ValueError(f"config.memories has {bad}; expected names from {list(MEMORIES)}")
    if not names:
        raise ValueError(f"config.memories={config.memories!r}; expected at least one of "
                         f"{list(MEMORIES)}")
    cfg = model_config(config)
    params0, _ = init_params(cfg, jax.random.key(config.seed))
    chance = 1.0 / config.num_passkeys
    print(f"memory_recall: {config.num_segments} segments x {config.segment_len} tokens, "
          f"{config.num_passkeys} passkeys (chance {chance:.3f}), {config.steps} steps x batch "
          f"{config.batch_size}, model {cfg.num_layers} layers x {cfg.hidden_size}")
    results = []
    for name in names:
        r = _train_and_eval(name, config, cfg, params0, jax.random.key(config.seed + 1))
        results.append(r)
        print(f"  {name:7s} {r['params']:7d} params  {r['train_seconds']:6.1f} s  loss "
              f"{r['final_loss']:.3f}  accuracy by distance: "
              + " ".join(f"{a:.2f}" for a in r["accuracy"]), flush=True)
    os.makedirs(workdir, exist_ok=True)
    _write_csv(os.path.join(workdir, "memory_recall.csv"), results)
    _plot(os.path.join(workdir, "memory_recall.png"), results, chance, config)
    table = _markdown(results, chance, config)
    print(table)
    summary = {"chance": chance, "results": results,
               "distances": list(range(config.num_segments))}
    return write_summary(workdir, summary, markdown=table)


def _write_csv(path, results):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["memory", "distance_segments", "accuracy", "params", "train_seconds",
                    "final_loss"])
        for r in results:
            for d, acc in enumerate(r["accuracy"]):
                w.writerow([r["memory"], d, f"{acc:.4f}", r["params"], f"{r['train_seconds']:.1f}",
                            f"{r['final_loss']:.4f}"])


def _markdown(results, chance, config):
    ds = range(config.num_segments)
    lines = ["| memory | params | " + " | ".join(f"d={d}" for d in ds) + " |",
             "|---|---:|" + "---:|" * len(ds)]
    for r in results:
        lines.append(f"| {_TITLES[r['memory']]} | {r['params']:,} | "
                     + " | ".join(f"{a:.2f}" for a in r["accuracy"]) + " |")
    lines.append(f"\nAccuracy of naming the passkey `d` segments back (segment of "
                 f"{config.segment_len} tokens); chance {chance:.3f}.")
    return "\n".join(lines)


def _plot(path, results, chance, config):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(range(config.num_segments), r["accuracy"], marker="o",
                label=_TITLES[r["memory"]])
    ax.axhline(chance, color="gray", linestyle="--", label="chance")
    ax.set_xlabel(f"passkey distance (segments of {config.segment_len} tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
