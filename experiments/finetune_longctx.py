"""Long-context fine-tuning on short chunks: RoPE scaling, Self-Extend, ReRoPE, PoSE positions.

A small random decoder is first trained on synthetic passkey retrieval at `config.length`
tokens with plain RoPE (the "original window"). Each method in `config.methods` then stretches
the window by `config.factor`:

- "none": plain RoPE, unchanged.
- "pi": position interpolation (RoPE `linear`, factor).
- "dynamic": dynamic NTK (RoPE `dynamic`, factor, max_position_embeddings = length): theta
  grows with the sequence length past the window, recomputed per evaluation length.
- "yarn": YaRN (factor, original_max_position_embeddings = length).
- "self_extend": plain RoPE + Self-Extend at evaluation (`PositionConfig` type self_extend,
  neighbour window `self_extend_window`, group size `self_extend_group`; 0 = auto: window
  length // 2 and the smallest group whose grouped positions of the longest evaluation length
  stay inside the original window).
- "rerope": plain RoPE + ReRoPE at evaluation (distances >= `rerope_window` clipped to it; 0 =
  length // 2; no log-length query scaling, which the model was not trained with).

Each method is evaluated "as is" (on the pretrained weights) and "+ PoSE fine-tune": after
`config.finetune_steps` more steps on chunks of the same short length whose position ids are
PoSE-skipped over the target window (`lcm.positions.pose.pose_positions`, length * factor)
under the method's RoPE. Self-Extend and ReRoPE change attention only at evaluation and keep
plain RoPE, so their fine-tuned weights are the plain-RoPE + PoSE ones ("none"'s; trained once
and shared). Training weights the answer tokens 1 and every other next-token prediction
`filler_loss_weight`, so the model is also a (trivial) language model of the filler.

Every variant is scored on fresh passkey samples at each of `config.eval_lengths` (depths
uniform; default L, 2L, 4L, 8L):
- accuracy: both answer tokens argmax-correct (teacher-forced);
- perplexity: exp of the mean next-token NLL over the filler text of those sequences (every
  prediction whose target is a filler token: all but the key, the query marker and the
  answer). The filler is i.i.d. uniform over F = vocab_size - 2 - num_values tokens, so no
  model can do better than F in expectation (46 by default) and a calibrated one reads F at
  every length; the excess over F measures how much the model degrades at that length;
- answer NLL: the mean NLL of the answer tokens.

Writes results.csv, results.md (accuracy and perplexity tables), accuracy.png (accuracy and
perplexity vs length, one colour per method, dashed = fine-tuned) and summary.json. See
configs/finetune_longctx.py.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments.workdir import write_summary, write_text
from lcm.checks import check_int, check_number
from lcm.config import AttentionConfig, ModelConfig, PositionConfig, RopeConfig
from lcm.model import forward, init_params
from lcm.positions.pose import pose_positions
from lcm.train import OptimizerConfig, init_train_state, make_optimizer, make_train_step

MARK = 1  # the passkey marker; answer values are 2 .. 2 + num_values - 1, filler above
METHODS = ("none", "pi", "dynamic", "yarn", "self_extend", "rerope")


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
    """The RoPE a method trains and evaluates with (Self-Extend / ReRoPE: plain RoPE)."""
    if method in ("none", "self_extend", "rerope"):
        return RopeConfig()
    if method == "pi":
        return RopeConfig(rope_type="linear", factor=float(factor))
    if method == "dynamic":
        return RopeConfig(rope_type="dynamic", factor=float(factor),
                          max_position_embeddings=length)
    if method == "yarn":
        return RopeConfig(rope_type="yarn", factor=float(factor),
                          original_max_position_embeddings=length)
    raise ValueError(f"method={method!r}; expected one of {list(METHODS)}")


def extension_windows(config) -> tuple[int, int, int]:
    """(self_extend_window, self_extend_group, rerope_window) with the config's 0s resolved."""
    L = config.length
    w = config.self_extend_window or max(1, L // 2)
    g = config.self_extend_group
    if not g:  # grouped query position of the last token, top // g + w - w / g, below L
        top = max(config.eval_lengths) - 1
        g = next(g for g in range(1, top + 2) if top // g + w - w / g < L or g > top)
    return w, max(1, g), config.rerope_window or max(1, L // 2)


def method_positions(method: str, config) -> PositionConfig:
    """The attention-side position option a method evaluates with."""
    w, g, rw = extension_windows(config)
    if method == "self_extend":
        return PositionConfig(type="self_extend", window=w, group_size=g)
    if method == "rerope":
        return PositionConfig(type="rerope", window=rw)
    return PositionConfig()


@functools.lru_cache(maxsize=None)
def _scorer(cfg: ModelConfig, num_digits: int, filler_low: int):
    d = num_digits

    @jax.jit
    def score(params, tokens):
        logits = forward(params, tokens, cfg)
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]  # [B, T-1]
        answer = tokens[:, -d:]
        ok = jnp.all(jnp.argmax(logits[:, -d - 1:-1], -1) == answer, axis=-1)
        filler = tokens[:, 1:] >= filler_low
        return (ok, jnp.mean(nll[:, -d:], -1), jnp.sum(jnp.where(filler, nll, 0.0)),
                jnp.sum(filler))

    return score


def evaluate(params, cfg: ModelConfig, config, length: int) -> tuple[float, float, float]:
    """(accuracy, perplexity, mean answer NLL) on config.eval_samples passkey rows at `length`.

    perplexity = exp(mean NLL of the next-token predictions whose target is a filler token)."""
    score = _scorer(cfg, config.num_digits, 2 + config.num_values)
    correct, answer_nll, total, count = [], [], 0.0, 0
    for start in range(0, config.eval_samples, config.eval_batch_size):
        size = min(config.eval_batch_size, config.eval_samples - start)
        tokens, _ = passkey_batch(config.seed + 1, start, size, length,
                                  vocab_size=cfg.vocab_size, num_values=config.num_values,
                                  num_digits=config.num_digits)
        ok, nll, filler_nll, filler_count = score(params, jnp.asarray(tokens))
        correct.append(np.asarray(ok))
        answer_nll.append(np.asarray(nll))
        total += float(filler_nll)
        count += int(filler_count)
    return (float(np.concatenate(correct).mean()), math.exp(total / count),
            float(np.concatenate(answer_nll).mean()))


def train(params, cfg: ModelConfig, config, *, steps: int, learning_rate: float, seed: int,
          pose_target: int | None):
    """`steps` AdamW steps on passkey rows at config.length (answer tokens weight 1, the other
    predictions config.filler_loss_weight); PoSE positions over `pose_target` when given.
    Returns (params, losses)."""
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
        weights = np.maximum(loss_mask.astype(np.float32), config.filler_loss_weight)
        batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(weights)}
        if pose is not None:
            batch["positions"] = pose(jax.random.fold_in(jax.random.key(seed), i))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if (i + 1) % max(1, steps // 5) == 0:
            logging.info("train step %d/%d: loss %.4f", i + 1, steps, losses[-1])
    return state.params, losses


def check_config(config) -> None:
    """Steps, sizes and learning rates, checked before any model is built."""
    for name, minimum in (("seed", 0), ("length", 1), ("self_extend_window", 0),
                          ("self_extend_group", 0), ("rerope_window", 0), ("pretrain_steps", 1),
                          ("finetune_steps", 0), ("batch_size", 1), ("eval_samples", 1),
                          ("eval_batch_size", 1), ("num_values", 2), ("num_digits", 1)):
        check_int("config", name, config[name], minimum)
    for name in ("learning_rate", "finetune_learning_rate"):
        check_number("config", name, config[name], 0, lo_open=True)
    check_number("config", "factor", config.factor, 1)
    check_number("config", "filler_loss_weight", config.filler_loss_weight, 0)
    for name in ("eval_lengths", "methods"):
        if not config[name]:
            raise ValueError(f"config.{name}={config[name]!r}; expected at least one")


def run(config, workdir: str) -> dict:
    check_config(config)
    start_time = time.perf_counter()
    m = config.model
    base = ModelConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                       num_layers=m.num_layers, num_heads=m.num_heads,
                       num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                       intermediate_size=m.intermediate_size,
                       max_position_embeddings=config.length,
                       attention=AttentionConfig(impl=m.attention_impl, block_q=m.block,
                                                 block_k=m.block))
    for method in config.methods:  # raise on a bad name or window first
        method_rope(method, config.factor, config.length)
        method_positions(method, config)
    params, _ = init_params(base, jax.random.key(config.seed))
    print(f"pretraining {config.pretrain_steps} steps at length {config.length}", flush=True)
    params, pre_losses = train(params, base, config, steps=config.pretrain_steps,
                               learning_rate=config.learning_rate, seed=config.seed,
                               pose_target=None)
    target = int(config.length * config.factor)
    tuned_by_rope = {}  # RopeConfig -> PoSE-fine-tuned params (shared by none/SE/ReRoPE)
    rows = []
    for method in config.methods:
        rope = method_rope(method, config.factor, config.length)
        cfg = dataclasses.replace(base, rope=rope,
                                  positions=method_positions(method, config))
        variants = [("as is", params)]
        if config.finetune_steps:
            if rope not in tuned_by_rope:
                print(f"fine-tuning RoPE {rope.rope_type} + PoSE ({config.finetune_steps} "
                      f"steps, chunks of {config.length} over {target} positions)", flush=True)
                tuned_by_rope[rope], _ = train(
                    params, dataclasses.replace(base, rope=rope), config,
                    steps=config.finetune_steps, learning_rate=config.finetune_learning_rate,
                    seed=config.seed + 2, pose_target=target)
            variants.append(("+ PoSE fine-tune", tuned_by_rope[rope]))
        for variant, p in variants:
            for length in config.eval_lengths:
                accuracy, perplexity, nll = evaluate(p, cfg, config, length)
                rows.append({"method": method, "variant": variant, "length": length,
                             "accuracy": accuracy, "perplexity": perplexity,
                             "answer_nll": nll})
                print(f"{method:11s} {variant:17s} length {length:5d}: accuracy "
                      f"{accuracy:.3f}, perplexity {perplexity:.2f}, answer NLL {nll:.3f}",
                      flush=True)
    seconds = time.perf_counter() - start_time
    markdown = results_table(rows, config, seconds=seconds)
    write_text(os.path.join(workdir, "results.csv"), _csv(rows))
    _plot(rows, config, os.path.join(workdir, "accuracy.png"))
    print("\n" + markdown, flush=True)
    w, g, rw = extension_windows(config)
    return write_summary(workdir, {
        "rows": rows, "pretrain_final_loss": pre_losses[-1], "target_length": target,
        "self_extend": {"window": w, "group_size": g}, "rerope_window": rw,
        "seconds": time.perf_counter() - start_time}, markdown=markdown)


def method_names(config) -> dict:
    w, g, rw = extension_windows(config)
    f = f"×{config.factor:g}"
    return {"none": "RoPE (no scaling)", "pi": f"PI {f}", "dynamic": f"NTK dynamic {f}",
            "yarn": f"YaRN {f}", "self_extend": f"Self-Extend (w {w}, g {g})",
            "rerope": f"ReRoPE (w {rw})"}


def results_table(rows, config, *, seconds: float | None = None) -> str:
    lengths = list(config.eval_lengths)
    names = method_names(config)
    target = int(config.length * config.factor)
    filler = config.model.vocab_size - 2 - config.num_values
    keys = list(dict.fromkeys((r["method"], r["variant"]) for r in rows))
    header = ["| method | " + " | ".join(str(x) for x in lengths) + " |",
              "|---|" + "---:|" * len(lengths)]

    def table(field, fmt):
        lines = list(header)
        for method, variant in keys:
            val = {r["length"]: r[field] for r in rows
                   if r["method"] == method and r["variant"] == variant}
            lines.append(f"| {names[method]} {variant} | "
                         + " | ".join(format(val[x], fmt) for x in lengths) + " |")
        return lines

    took = "" if seconds is None else f"; {seconds / 60:.1f} minutes"
    lines = [f"Trained at {config.length} tokens; fine-tuned with PoSE on {config.length}-token "
             f"chunks over {target} positions ({config.finetune_steps} steps; Self-Extend and "
             f"ReRoPE reuse the plain-RoPE fine-tune); {config.eval_samples} passkey samples "
             f"per length{took}.", "",
             "Passkey accuracy (both answer tokens argmax-correct):", "", *table("accuracy", ".2f"),
             "", f"Perplexity of the filler text (exp of the mean next-token NLL over every filler "
             f"target of the same sequences; the filler is i.i.d. uniform over {filler} tokens, "
             f"so {filler} is the floor and the excess is degradation):",
             "", *table("perplexity", ".2f")]
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

    names = method_names(config)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for method, variant in dict.fromkeys((r["method"], r["variant"]) for r in rows):
        sel = [r for r in rows if r["method"] == method and r["variant"] == variant]
        style = dict(marker="o", color=colors[method],
                     linestyle="-" if variant == "as is" else "--")
        axes[0].plot([r["length"] for r in sel], [r["accuracy"] for r in sel],
                     label=f"{names[method]} {variant}", **style)
        axes[1].plot([r["length"] for r in sel], [r["perplexity"] for r in sel], **style)
    for ax in axes:
        ax.axvline(config.length, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
    axes[0].set_ylabel("passkey accuracy")
    axes[0].set_ylim(-0.02, 1.02)
    filler = config.model.vocab_size - 2 - config.num_values
    axes[1].axhline(filler, color="gray", linewidth=0.8, linestyle=":")
    axes[1].set_ylabel(f"filler perplexity (floor {filler})")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
