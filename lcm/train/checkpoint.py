"""Orbax checkpoints of a training run: the TrainState and the data iterator's state.

Saves are asynchronous (the step loop goes on while arrays are written) and atomic (Orbax
writes to a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint as the latest). Restoring gives the same arrays, shardings and data
position, so a resumed run continues the same loss curve bit for bit.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Checkpoints under `directory` every `every_steps` steps, keeping the `keep` latest.

        ckpt = Checkpointer(workdir + "/checkpoints", every_steps=100)
        state, data_state = ckpt.restore_latest(state, data_iter.get_state())  # or the inputs
        ...
        ckpt.maybe_save(step, state, data_iter.get_state())
        ckpt.close()  # waits for the last asynchronous save
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int = 2,
                 asynchronous: bool = True):
        if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps <= 0:
            raise ValueError(f"every_steps={every_steps!r}; expected a positive int")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep <= 0:
            raise ValueError(f"keep={keep!r}; expected a positive int")
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    @property
    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: dict | None = None) -> None:
        """Starts an asynchronous save of `state` (any pytree) and the JSON-able `data_state`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def maybe_save(self, step: int, state, data_state: dict | None = None) -> bool:
        """Saves when `step` is a multiple of every_steps; returns whether it did."""
        if step % self.every_steps:
            return False
        self.save(step, state, data_state)
        return True

    def restore(self, step: int, like, *, with_data: bool = True):
        """`(state, data_state)` saved at `step`; `like` is a state (or its `jax.eval_shape`,
        with shardings) that gives the tree structure, dtypes and placement."""
        abstract = jax.tree.map(_abstract, like)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["data"] if with_data else None

    def restore_latest(self, like, data_state=None, *, with_data: bool = True):
        """The latest checkpoint as `(state, data_state, step)`, or `(like, data_state, 0)`
        when there is none."""
        step = self.latest_step
        if step is None:
            return like, data_state, 0
        state, data = self.restore(step, like, with_data=with_data)
        return state, data if with_data else data_state, step

    def wait(self) -> None:
        """Blocks until every started save is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
