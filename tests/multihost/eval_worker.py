"""One process of the two-process evaluation test (tests/eval/test_loop_multihost.py).

Run on every process: `python eval_worker.py --coordinator=HOST:PORT --num_processes=N
--process_id=I --root=DIR`. Each process has 2 CPU devices; the global mesh splits every batch's
rows over its data axis (4 = every device). Process I's workdirs are DIR/p{I}/... (its own
disk, as hosts without a shared file system have), so whatever lands under DIR/p1 was written
by a process that must not write. Three evaluations in order:

1. `fresh`: a new workdir;
2. `resumed`: DIR/p0/resumed holds part of a run's results (and a torn last line), which only
   process 0 can see; the run must finish it;
3. `refused`: `fresh` again with other options; every process must raise the setup error;
4. `blocked`: DIR/p0/blocked is a file on process 0's disk, so creating the workdir fails
   there (FileExistsError); every process must raise rather than wait for process 0.
"""

import os
import sys

from multihost_launch import start_worker  # noqa: E402

args = start_worker(2)

import jax  # noqa: E402

import dataclasses  # noqa: E402

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_TESTS, os.path.join(_TESTS, "eval")]  # helpers and the eval tests' data
from test_loop_multihost import OPTIONS, RECORDS  # noqa: E402
from test_loop import CFG, PARAMS, TOK  # noqa: E402

from lcm.eval import evaluate  # noqa: E402
from lcm.sharding import make_mesh  # noqa: E402

mesh = make_mesh((jax.device_count(), 1, 1, 1))
me = f"process {jax.process_index()}"
workdir = os.path.join(args.root, f"p{jax.process_index()}")
for name in ("fresh", "resumed"):
    summary = evaluate(PARAMS, CFG, RECORDS, TOK, os.path.join(workdir, name), options=OPTIONS,
                       mesh=mesh)
    print(f"{me}: {name} wrote {summary['timing']['samples_this_session']} samples, "
          f"summary of {summary['num_samples']} samples", flush=True)
try:
    evaluate(PARAMS, CFG, RECORDS, TOK, os.path.join(workdir, "fresh"),
             options=dataclasses.replace(OPTIONS, pad_multiple=64), mesh=mesh)
    print(f"{me}: refused: no", flush=True)
except ValueError as e:
    print(f"{me}: refused: {e}", flush=True)
try:
    evaluate(PARAMS, CFG, RECORDS, TOK, os.path.join(workdir, "blocked"), options=OPTIONS,
             mesh=mesh)
    print(f"{me}: blocked: no", flush=True)
except (OSError, RuntimeError) as e:
    print(f"{me}: blocked: {type(e).__name__}: {e}", flush=True)
jax.distributed.shutdown()
