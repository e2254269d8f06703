"""Long-context fine-tuning on short chunks: RoPE scaling (PI, YaRN) + PoSE positions.

A small random decoder is first trained on synthetic passkey retrieval at `config.length`
tokens with plain RoPE (the "original window"). Each method in `config.methods` then changes its
RoPE to stretch the window by `config.factor` ("none": unchanged; "pi": linear interpolation;
"yarn": YaRN with original_max_position_embeddings = length) and is evaluated as is, and after
`config.finetune_steps` more steps on chunks of the same short length whose position ids are
PoSE-skipped over the target window (`lcm.positions.pose.pose_positions`, length * factor).
Every variant is scored on fresh passkey samples at each of `config.eval_lengths` (depths
uniform): accuracy (both answer tokens argmax-correct, teacher-forced) and answer NLL.

Writes results.csv, results.md (accuracy table) and accuracy.png (accuracy vs length per
variant) plus summary.json. See configs/finetune_longctx.py.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments.workdir import write_summary, write_text
from lcm.config import AttentionConfig, ModelConfig, RopeConfig
from lcm.model import forward, init_params
from lcm.positions.pose import pose_positions
from lcm.train import OptimizerConfig, init_train_state, make_optimizer, make_train_step

MARK = 1  # the passkey marker; answer values are 2 .. 2 + num_values - 1, filler above


def passkey_batch(seed: int, start: int, batch_size: int, length: int, *, vocab_size: int,
                  num_values: int, num_digits: int):
    """Rows `start .. start + batch_size` of the passkey task at `length` (NumPy, int32):

    filler tokens, MARK + the key's digits at a uniform depth, and MARK + the digits again at
    the end; loss_mask is 1 on the final digits (the answer). Row i depends on (seed, length, i).
    """
    filler_low = 2 + num_values
    tokens = np.empty((batch_size, length), np.int32)
    for row in range(batch_size):
        rng = np.random.default_rng((seed, length, start + row))
        tokens[row] = rng.integers(filler_low, vocab_size, length)
        digits = rng.integers(2, 2 + num_values, num_digits)
        depth = int(rng.integers(0, length - 2 * (num_digits + 1) + 1))
        tokens[row, depth] = MARK
        tokens[row, depth + 1:depth + 1 + num_digits] = digits
        tokens[row, -num_digits - 1] = MARK
        tokens[row, -num_digits:] = digits
    loss_mask = np.zeros_like(tokens)
    loss_mask[:, -num_digits:] = 1
    return tokens, loss_mask


def method_rope(method: str, factor: float, length: int) -> RopeConfig:
    if method == "none":
        return RopeConfig()
    if method == "pi":
        return RopeConfig(rope_type="linear", factor=float(factor))
    if method == "yarn":
        return RopeConfig(rope_type="yarn", factor=float(factor),
                          original_max_position_embeddings=length)
    raise ValueError(f"method={method!r}; expected one of ['none', 'pi', 'yarn']")


def evaluate(params, cfg: ModelConfig, config, length: int) -> tuple[float, float]:
    """(accuracy, mean answer NLL) on config.eval_samples passkey rows at `length`."""
    d = config.num_digits

    @jax.jit
    def score(params, tokens):
        logits = forward(params, tokens, cfg)[:, -d - 1:-1]
        logp = jax.nn.log_softmax(logits, -1)
        answer = tokens[:, -d:]
        nll = -jnp.take_along_axis(logp, answer[..., None], -1)[..., 0]
        return jnp.all(jnp.argmax(logits, -1) == answer, axis=-1), jnp.mean(nll, -1)

    correct, nlls = [], []
    for start in range(0, config.eval_samples, config.eval_batch_size):
        size = min(config.eval_batch_size, config.eval_samples - start)
        tokens, _ = passkey_batch(config.seed + 1, start, size, length,
                                  vocab_size=cfg.vocab_size, num_values=config.num_values,
                                  num_digits=d)
        ok, nll = score(params, jnp.asarray(tokens))
        correct.append(np.asarray(ok))
        nlls.append(np.asarray(nll))
    return float(np.concatenate(correct).mean()), float(np.concatenate(nlls).mean())


def train(params, cfg: ModelConfig, config, *, steps: int, learning_rate: float, seed: int,
          pose_target: int | None):
    """`steps` AdamW steps on passkey rows at config.length; PoSE positions over `pose_target`
    when given. Returns (params, losses)."""
    opt = OptimizerConfig(learning_rate=learning_rate, warmup_steps=max(1, steps // 10),
                          total_steps=steps, weight_decay=0.0)
    optimizer = make_optimizer(opt)
    step = make_train_step(cfg, optimizer)
    state = init_train_state(jax.tree.map(jnp.copy, params), optimizer)
    B, L = config.batch_size, config.length
    pose = None if pose_target is None else jax.jit(
        lambda k: pose_positions(k, L, pose_target, batch_size=B))
    losses = []
    for i in range(steps):
        tokens, loss_mask = passkey_batch(seed, i * B, B, L, vocab_size=cfg.vocab_size,
                                          num_values=config.num_values,
                                          num_digits=config.num_digits)
        batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(loss_mask)}
        if pose is not None:
            batch["positions"] = pose(jax.random.fold_in(jax.random.key(seed), i))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if (i + 1) % max(1, steps // 5) == 0:
            logging.info("train step %d/%d: loss %.4f", i + 1, steps, losses[-1])
    return state.params, losses


def run(config, workdir: str) -> dict:
    start_time = time.perf_counter()
    m = config.model
    base = ModelConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                       num_layers=m.num_layers, num_heads=m.num_heads,
                       num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                       intermediate_size=m.intermediate_size,
                       max_position_embeddings=config.length,
                       attention=AttentionConfig(impl=m.attention_impl, block_q=m.block,
                                                 block_k=m.block))
    for method in config.methods:
        method_rope(method, config.factor, config.length)  # raise on a bad name first
    params, _ = init_params(base, jax.random.key(config.seed))
    print(f"pretraining {config.pretrain_steps} steps at length {config.length}", flush=True)
    params, pre_losses = train(params, base, config, steps=config.pretrain_steps,
                               learning_rate=config.learning_rate, seed=config.seed,
                               pose_target=None)
    target = int(config.length * config.factor)
    rows = []
    for method in config.methods:
        cfg = dataclasses.replace(base, rope=method_rope(method, config.factor, config.length))
        variants = [("as is", params)]
        if config.finetune_steps:
            print(f"fine-tuning {method} + PoSE ({config.finetune_steps} steps, chunks of "
                  f"{config.length} over {target} positions)", flush=True)
            tuned, _ = train(params, cfg, config, steps=config.finetune_steps,
                             learning_rate=config.finetune_learning_rate,
                             seed=config.seed + 2, pose_target=target)
            variants.append(("+ PoSE fine-tune", tuned))
        for variant, p in variants:
            for length in config.eval_lengths:
                accuracy, nll = evaluate(p, cfg, config, length)
                rows.append({"method": method, "variant": variant, "length": length,
                             "accuracy": accuracy, "answer_nll": nll})
                print(f"{method:5s} {variant:17s} length {length:5d}: accuracy {accuracy:.3f}, "
                      f"answer NLL {nll:.3f}", flush=True)
    markdown = results_table(rows, config)
    write_text(os.path.join(workdir, "results.csv"), _csv(rows))
    _plot(rows, config, os.path.join(workdir, "accuracy.png"))
    print("\n" + markdown, flush=True)
    return write_summary(workdir, {
        "rows": rows, "pretrain_final_loss": pre_losses[-1], "target_length": target,
        "seconds": time.perf_counter() - start_time}, markdown=markdown)


def results_table(rows, config) -> str:
    lengths = list(config.eval_lengths)
    names = {"none": "RoPE (no scaling)", "pi": f"PI ×{config.factor:g}",
             "yarn": f"YaRN ×{config.factor:g}"}
    target = int(config.length * config.factor)
    lines = [f"Passkey accuracy ({config.eval_samples} samples per length; trained at "
             f"{config.length} tokens, fine-tuned with PoSE over {target} positions)", "",
             "| method | " + " | ".join(str(x) for x in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    keys = dict.fromkeys((r["method"], r["variant"]) for r in rows)
    for method, variant in keys:
        acc = {r["length"]: r["accuracy"] for r in rows
               if r["method"] == method and r["variant"] == variant}
        lines.append(f"| {names[method]} {variant} | "
                     + " | ".join(f"{acc[x]:.2f}" for x in lengths) + " |")
    return "\n".join(lines)


def _csv(rows) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _plot(rows, config, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, variant in dict.fromkeys((r["method"], r["variant"]) for r in rows):
        pts = [(r["length"], r["accuracy"]) for r in rows
               if r["method"] == method and r["variant"] == variant]
        ax.plot(*zip(*pts), marker="o", linestyle="-" if variant == "as is" else "--",
                label=f"{method} {variant}")
    ax.axvline(config.length, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
