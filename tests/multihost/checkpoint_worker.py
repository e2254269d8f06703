"""One process of the two-process checkpoint test (tests/train/test_checkpoint_multihost.py).

Run on every process: `python checkpoint_worker.py --coordinator=HOST:PORT --num_processes=N
--process_id=I --root=DIR`. Each process has 2 CPU devices; the state's array is sharded over
all 4, and the checkpoints live in one shared directory DIR/checkpoints, as on a pod with a
shared file system. In order:

1. saves steps 1, 2 and 3 (asynchronously), each with its own values and data position;
2. process 0 overwrites 64 bytes in the middle of step 3's largest file (both processes then
   meet at a barrier);
3. a new Checkpointer on every process restores the latest intact checkpoint: step 2, with
   step 2's values on every shard, and step 3 renamed `3.corrupt` once;
4. step 3 is saved again and becomes the latest, restored by both;
5. process 1 alone cannot use step 3 (its verify reports a fault, as a host with a stale or
   unreadable view would): both processes still restore the same step, 2, and step 3 is renamed
   `3.corrupt1`.
"""

import os
import sys
import warnings

from multihost_launch import start_worker  # noqa: E402

args = start_worker(2)

import jax  # noqa: E402

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from lcm.train.checkpoint import Checkpointer  # noqa: E402

me = f"process {jax.process_index()}"
mesh = jax.make_mesh((jax.device_count(),), ("data",))
sharding = NamedSharding(mesh, PartitionSpec("data"))
directory = os.path.join(args.root, "checkpoints")


def state_at(step: int):
    values = np.arange(64 * 16, dtype=np.float32).reshape(64, 16) + 1000 * step
    return {"w": jax.make_array_from_callback(values.shape, sharding, lambda i: values[i]),
            "step": np.int32(step)}


def gathered(state):
    return np.asarray(multihost_utils.process_allgather(state["w"], tiled=True))


ckpt = Checkpointer(directory, every_steps=1, keep=3)
for step in (1, 2, 3):
    ckpt.save(step, state_at(step), {"position": 10 * step})
ckpt.close()
multihost_utils.sync_global_devices("saved")

if jax.process_index() == 0:
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(directory, "3")) for n in ns]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        f.write(b"\xff" * 64)
multihost_utils.sync_global_devices("corrupted")

like = state_at(0)
ckpt = Checkpointer(directory, every_steps=1, keep=3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state, data, step = ckpt.restore_latest(like, {"position": 0})
assert step == 2 and data == {"position": 20}, (step, data)
np.testing.assert_array_equal(gathered(state), gathered(state_at(2)))
messages = [str(w.message) for w in caught]
assert any("resumed from the checkpoint at step 2" in m for m in messages), messages
print(f"{me}: resumed from step {step} with step 2's values; warned: {messages[-1][:80]}",
      flush=True)

ckpt.save(3, state_at(3), {"position": 30})
ckpt.close()
multihost_utils.sync_global_devices("saved again")
ckpt = Checkpointer(directory, every_steps=1, keep=3)
state, data, step = ckpt.restore_latest(like, {"position": 0})
assert step == 3 and data == {"position": 30}, (step, data)
np.testing.assert_array_equal(gathered(state), gathered(state_at(3)))
ckpt.close()
print(f"{me}: saved step 3 anew and restored it", flush=True)
multihost_utils.sync_global_devices("restored again")


class OneHostCannotRead(Checkpointer):
    def verify(self, step):
        if jax.process_index() == 1 and step == 3:
            return "unreadable on this host"
        return super().verify(step)


ckpt = OneHostCannotRead(directory, every_steps=1, keep=3)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    state, data, step = ckpt.restore_latest(like, {"position": 0})
assert step == 2 and data == {"position": 20}, (step, data)
np.testing.assert_array_equal(gathered(state), gathered(state_at(2)))
ckpt.close()
print(f"{me}: with one host unable to read step 3, resumed from step {step}; checkpoints: "
      f"{sorted(os.listdir(directory))}", flush=True)
sys.stdout.flush()
