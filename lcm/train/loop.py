"""The training loop: steps, metrics, checkpoints and exact resumption."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import jax
from absl import logging

from lcm.checks import check_int
from lcm.train.checkpoint import Checkpointer
from lcm.train.metrics import MetricsWriter


def resume(checkpointer: Checkpointer, state, data_iter, writer: MetricsWriter | None = None):
    """Restores the latest checkpoint (if any) into `state`'s structure and placement, moves
    `data_iter` (a Grain iterator) to the saved position and drops metric rows past it.
    Returns the state to continue from (unchanged when there is no checkpoint)."""
    restored, data_state, step = checkpointer.restore_latest(state, data_iter.get_state())
    if step:
        data_iter.set_state(data_state)
        logging.info("resumed from the checkpoint at step %d", step)
    if writer is not None:
        writer.truncate_after(step)
    return restored


def fit(step_fn: Callable, state, data_iter: Iterator, *, num_steps: int,
        checkpointer: Checkpointer | None = None, writer: MetricsWriter | None = None,
        log_every: int = 1, put_batch: Callable = lambda batch: batch,
        extra_metrics: Callable[[int], dict] | None = None,
        on_step: Callable[[int, dict], None] | None = None):
    """Runs `state = step_fn(state, put_batch(next(data_iter)))` from `state.step` to
    `num_steps`, logging every `log_every` steps (and the last) to `writer`, checkpointing
    with the data iterator's state (`checkpointer.every_steps`, and at the end).

    `extra_metrics(step)` adds host-side values (e.g. the learning rate); `on_step(step,
    metrics)` sees each logged row. Returns the final state.
    """
    check_int(None, "num_steps", num_steps, 0)
    check_int(None, "log_every", log_every, 1)
    step = int(state.step)
    last_saved = step
    while step < num_steps:
        start = time.perf_counter()
        batch = put_batch(next(data_iter))
        state, metrics = step_fn(state, batch)
        step += 1
        if step % log_every == 0 or step == num_steps:
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            row["step_seconds"] = time.perf_counter() - start
            row.update(extra_metrics(step) if extra_metrics else {})
            if writer is not None:
                writer.write(step, row)
            logging.info("step %d: %s", step,
                         ", ".join(f"{k} {v:.4g}" for k, v in sorted(row.items())))
            if on_step is not None:
                on_step(step, row)
        if checkpointer is not None and checkpointer.maybe_save(step, state,
                                                                data_iter.get_state()):
            last_saved = step
    if checkpointer is not None:
        if last_saved != step:
            checkpointer.save(step, state, data_iter.get_state())
        checkpointer.wait()
    return state
