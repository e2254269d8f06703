"""Orbax checkpoints of a training run: the TrainState and the data iterator's state.

Saves are asynchronous (the step loop goes on while arrays are written) and atomic (Orbax
writes to a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint as the latest). Restoring gives the same arrays, shardings and data
position, so a resumed run continues the same loss curve bit for bit.

Orbax (0.12) checks no checksums of what it reads back, so each checkpoint carries a manifest,
`lcm_sha256.json`: the size and SHA-256 of every file of its items, written into Orbax's
temporary directory before the rename (the manifest is part of the atomic checkpoint).
`restore_latest` verifies it and restores the newest checkpoint that both verifies and loads;
a newer one that does not (flipped bytes, a truncated or missing file, unreadable metadata, an
empty directory) is named in a warning and renamed `<step>.corrupt`, and the restore falls back
to the one before. When none is intact it raises, naming each checkpoint and its fault. With
several processes (a shared checkpoint directory), every process verifies, a checkpoint is used
only when all found it intact, process 0 alone renames, and all resume from the same step.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lcm.checks import check_int

MANIFEST = "lcm_sha256.json"
# Step-level files Orbax itself (re)writes at commit: not part of the items' contents.
_UNHASHED = {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}


class Checkpointer:
    """Checkpoints under `directory` every `every_steps` steps, keeping the `keep` latest.

        ckpt = Checkpointer(workdir + "/checkpoints", every_steps=100)
        state, data_state, step = ckpt.restore_latest(state, data_iter.get_state())
        ...
        ckpt.maybe_save(step, state, data_iter.get_state())
        ckpt.close()  # waits for the last asynchronous save
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int = 2,
                 asynchronous: bool = True):
        check_int(None, "every_steps", every_steps, 1)
        check_int(None, "keep", keep, 1)
        self.every_steps = int(every_steps)
        self.directory = os.path.abspath(directory)
        self._asynchronous = asynchronous
        self._lock = threading.Lock()
        self._saving = None  # the step whose asynchronous save is in flight
        self._saved = set()  # steps this Checkpointer wrote (sealed by wait() if still bare)
        async_options = (ocp.options.AsyncOptions(post_finalization_callback=self._seal_pending)
                         if asynchronous else None)
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True,
                                               enable_async_checkpointing=asynchronous,
                                               async_options=async_options)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    @property
    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint (verified or not), or None."""
        return self._manager.latest_step()

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state, data_state: dict | None = None) -> None:
        """Starts an asynchronous save of `state` (any pytree) and the JSON-able `data_state`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        self._manager.wait_until_finished()  # one save in flight: _saving names it
        self._saving = int(step)
        self._saved.add(int(step))
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if not self._asynchronous:
            self._seal(self.step_path(step))

    def maybe_save(self, step: int, state, data_state: dict | None = None) -> bool:
        """Saves when `step` is a multiple of every_steps; returns whether it did."""
        if step % self.every_steps:
            return False
        self.save(step, state, data_state)
        return True

    def verify(self, step: int) -> str | None:
        """None when the checkpoint at `step` matches its manifest (or has none: a checkpoint
        written before manifests), else what is wrong with it."""
        return verify_manifest(self.step_path(step))

    def restore(self, step: int, like, *, with_data: bool = True):
        """`(state, data_state)` saved at `step`; `like` is a state (or its `jax.eval_shape`,
        with shardings) that gives the tree structure, dtypes and placement. Raises a
        ValueError naming the checkpoint when it fails its manifest."""
        if problem := self.verify(step):
            raise ValueError(f"checkpoint {self.step_path(step)} is corrupt: {problem}")
        abstract = jax.tree.map(_abstract, like)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["data"] if with_data else None

    def restore_latest(self, like, data_state=None, *, with_data: bool = True):
        """The newest intact checkpoint as `(state, data_state, step)`, or `(like, data_state,
        0)` when there is none. Newer checkpoints that fail their manifest or do not load are
        named in a warning and renamed `<step>.corrupt` (so the run saves those steps anew);
        when every checkpoint fails, a ValueError names each one and its fault."""
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        bad = []
        for step in steps:
            problem = _agreed(self.verify(step))
            what = "is corrupt or incomplete"
            if problem is None:
                try:
                    state, data = self.restore(step, like, with_data=with_data)
                except Exception as e:  # noqa: BLE001 - any failure to load: try an older one
                    problem, what = _first_line(e), "cannot be restored"
                problem = _agreed(problem)
            if problem is not None:
                bad.append((step, problem))
                warnings.warn(f"checkpoint {self.step_path(step)} {what} ({problem}); trying "
                              f"an older one", stacklevel=3)
                continue
            if bad:
                self._quarantine([s for s, _ in bad])
                warnings.warn(f"resumed from the checkpoint at step {step} "
                              f"({self.step_path(step)}); the newer "
                              f"{[self.step_path(s) for s, _ in bad]} could not be used and "
                              f"were renamed <step>.corrupt", stacklevel=3)
            return state, data if with_data else data_state, step
        if bad:
            faults = "; ".join(f"{self.step_path(s)}: {why}" for s, why in bad)
            raise ValueError(f"no intact checkpoint under {self.directory} ({faults}); if the "
                             f"model or optimizer changed since they were saved, they are of "
                             f"another shape: use a new workdir; else delete the directory to "
                             f"start over, or restore it from a copy")
        return like, data_state, 0

    def wait(self) -> None:
        """Blocks until every started save is complete (and sealed with its manifest)."""
        self._manager.wait_until_finished()
        self._seal_unsealed()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def _seal_pending(self) -> None:
        # Orbax's post-finalization callback: the step is still in its temporary directory,
        # so the manifest is renamed into place with it.
        step = self._saving
        if step is None or jax.process_index() != 0:
            return
        tmp = [p for p in glob.glob(os.path.join(self.directory, f"{step}.*"))
               if "tmp" in os.path.basename(p) and os.path.isdir(p)]
        if len(tmp) == 1:
            self._seal(tmp[0])

    def _seal_unsealed(self) -> None:
        # Where the callback could not find the temporary directory: seal after the commit.
        if jax.process_index() != 0:
            return
        for step in self._manager.all_steps():
            path = self.step_path(step)
            if step in self._saved and not os.path.exists(os.path.join(path, MANIFEST)):
                self._seal(path)

    def _seal(self, path: str) -> None:
        with self._lock:
            write_manifest(path)

    def _quarantine(self, steps) -> None:
        if jax.process_index() == 0:
            for step in steps:
                path, n = self.step_path(step), 0
                target = f"{path}.corrupt"
                while os.path.exists(target):
                    n += 1
                    target = f"{path}.corrupt{n}"
                os.rename(path, target)
        if jax.process_count() > 1:  # every process lists the steps after the renames
            multihost_utils.sync_global_devices("lcm_checkpoint_quarantine")
        self._manager.reload()


def _agreed(problem: str | None) -> str | None:
    """With several processes, a checkpoint is used only if every process found it intact (so
    all restore the same step): a problem seen by some processes becomes every process's."""
    if jax.process_count() == 1:
        return problem
    flags = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
    if problem is None and flags.any():
        problem = f"process(es) {np.flatnonzero(flags).tolist()} could not use it"
    return problem


def _files(path: str) -> dict[str, str]:
    """{relative path: absolute path} of every file of a checkpoint's items."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel not in _UNHASHED:
                out[rel] = os.path.join(root, name)
    return out


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: str) -> None:
    """Writes `<path>/lcm_sha256.json`: size and SHA-256 of each file of the checkpoint."""
    files = {rel: [os.path.getsize(full), _sha256(full)] for rel, full in _files(path).items()}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, MANIFEST))


def verify_manifest(path: str) -> str | None:
    """None when the checkpoint directory `path` matches its manifest (or has none), else the
    first mismatch: a missing, resized, changed or unreadable file."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        return "no such directory"
    if not os.path.exists(manifest):
        return None if _files(path) else "the directory is empty"
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({_first_line(e)})"
    for rel, (size, digest) in sorted(files.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        if os.path.getsize(full) != size:
            return f"{full} has {os.path.getsize(full)} bytes, expected {size} (truncated?)"
        if _sha256(full) != digest:
            return f"{full} does not match its SHA-256 (the bytes changed)"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
