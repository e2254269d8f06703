"""The training loop: steps, metrics, checkpoints and exact resumption."""

from __future__ import annotations

import math
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
    metrics)` sees each logged row. A loss or param_norm that is NaN or infinite (checked on
    every logged or checkpointed step) raises a FloatingPointError naming the step, before that
    state is checkpointed. Returns the final state.
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
        saving = checkpointer is not None and step % checkpointer.every_steps == 0
        logged = step % log_every == 0 or step == num_steps
        if logged or saving:
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            _check_finite(row, step)  # before this state can be checkpointed
        if logged:
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


def _check_finite(row: dict, step: int) -> None:
    """Raises when the loss (of the params before the step) or the norm of the params after it
    is NaN or infinite: the weights are lost, and a resume must start from finite ones."""
    for name in ("loss", "param_norm"):
        if name in row and not math.isfinite(row[name]):
            raise FloatingPointError(
                f"step {step}: {name} is {row[name]}; stopped before this state is checkpointed "
                f"(lower the learning rate, check the data, or run with JAX_DEBUG_NANS=True to "
                f"find the operation)")
