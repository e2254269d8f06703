"""One process of the two-process ring attention test (also a template for a TPU pod slice).

Run the same script on every host: `python ring_worker.py --coordinator=HOST:PORT
--num_processes=N --process_id=I`. On a TPU pod slice `jax.distributed.initialize()` needs no
arguments; here two local processes of 4 CPU devices each talk over gloo. Each process builds
the same global q/k/v from a seed, runs ring attention (values and gradients) on the global
8-device mesh, and checks its own shards against the dense reference computed locally.
"""

import sys

from multihost_launch import start_worker  # noqa: E402

args = start_worker(None, root=False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from lcm.attention import Causal, Document, attend, ring_attention  # noqa: E402
from lcm.sharding import make_mesh  # noqa: E402

B, L, H, K, D = 2, 96, 4, 2, 8
mesh = make_mesh((1, 1, 1, jax.device_count()))  # global devices: every process's
keys = jax.random.split(jax.random.key(0), 4)
host = [np.asarray(jax.random.normal(kk, shape, jnp.float32)) for kk, shape in
        zip(keys, [(B, L, H, D), (B, L, K, D), (B, L, K, D), (B, L, H, D)])]
segs = (np.arange(L)[None] >= np.asarray([[30], [61]])).astype(np.int32)
seq = NamedSharding(mesh, PartitionSpec(None, "context"))
q, k, v, do = (jax.make_array_from_callback(x.shape, seq, lambda idx, x=x: x[idx]) for x in host)
segs_g = jax.make_array_from_callback(segs.shape, NamedSharding(mesh, PartitionSpec()),
                                      lambda idx: segs[idx])


@jax.jit
def run(q, k, v, segs, do):
    def f(q, k, v):
        return ring_attention(q, k, v, Causal() & Document(segs), load_balance="zigzag",
                              block_q=8, block_k=8)
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(do)


with jax.set_mesh(mesh):
    out, grads = run(q, k, v, segs_g, do)


def ref(q, k, v):
    return attend(q, k, v, Causal() & Document(jnp.asarray(segs)), impl="reference")


want, vjp = jax.vjp(ref, *(jnp.asarray(x) for x in host[:3]))
want_grads = vjp(jnp.asarray(host[3]))
worst = 0.0
for got, expected in [(out, want), *zip(grads, want_grads)]:
    for shard in got.addressable_shards:
        err = float(np.abs(np.asarray(shard.data) - np.asarray(expected)[shard.index]).max())
        worst = max(worst, err)
print(f"process {jax.process_index()}: {len(jax.local_devices())} local of {jax.device_count()} "
      f"devices, max error {worst:.2e}", flush=True)
jax.distributed.shutdown()
sys.exit(0 if worst < 1e-4 else 1)
