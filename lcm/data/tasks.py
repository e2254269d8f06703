"""Task registry: a task name -> its record generator, and grids of records as Grain datasets.

Every generator is `make(index, *, seed, length, tokenizer, **options) -> Record`; `make_record`
dispatches by name. `synthetic_dataset` lays a task over lengths (and, for the NIAH grid, depths)
as a `grain.MapDataset` with random access: element i is a pure function of i, so any element
regenerates alone, processes shard by slicing, and an iterator resumes from `{'next_index': i}`.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import grain

from lcm.checks import is_int
from lcm.data.infinitebench import make_infinitebench_passkey, make_kv_retrieval, make_number_string
from lcm.data.listops import make_listops
from lcm.data.niah import RULER_NIAH, make_niah, make_ruler_niah
from lcm.data.passkey import make_passkey
from lcm.data.records import Record
from lcm.data.ruler import make_cwe, make_fwe, make_qa, make_vt
from lcm.data.scbench import make_kv_session, make_niah_session

GENERATORS: dict[str, Callable[..., Record]] = {
    "passkey": make_passkey,
    "niah": make_niah,
    **{task: functools.partial(make_ruler_niah, task) for task in RULER_NIAH},
    "vt": make_vt, "cwe": make_cwe, "fwe": make_fwe,
    # qa_1 / qa_2 need the user's file: make_record("qa_1", i, ..., path="dev-v2.0.json").
    "qa_1": functools.partial(make_qa, dataset="squad"),
    "qa_2": functools.partial(make_qa, dataset="hotpotqa"),
    "infinitebench/passkey": make_infinitebench_passkey,
    "infinitebench/number_string": make_number_string,
    "infinitebench/kv_retrieval": make_kv_retrieval,
    "listops": make_listops,
}
# Multi-turn sessions: make(index, *, seed, length, tokenizer, num_turns) -> tuple of Records.
SESSIONS: dict[str, Callable[..., tuple[Record, ...]]] = {
    "scbench_kv": make_kv_session, "scbench_niah": make_niah_session,
}
# RULER's 13 tasks, in its order; the headline is their mean score per length.
RULER_TASKS = (*RULER_NIAH, "vt", "cwe", "fwe", "qa_1", "qa_2")


def register(task: str, make: Callable[..., Record]) -> None:
    """Adds a generator `make(index, *, seed, length, tokenizer, ...)` under `task`."""
    if task in GENERATORS:
        raise ValueError(f"task={task!r} is already registered")
    GENERATORS[task] = make


def make_record(task: str, index: int, *, seed: int, length: int, tokenizer, **options) -> Record:
    if task not in GENERATORS:
        raise ValueError(f"task={task!r}; expected one of {sorted(GENERATORS)}")
    return GENERATORS[task](index, seed=seed, length=length, tokenizer=tokenizer, **options)


def _positive_ints(name, values):
    values = tuple(values)
    if not values or any(not is_int(v) or v < 1 for v in values):
        raise ValueError(f"{name}={values!r}; expected a non-empty sequence of ints >= 1")
    return tuple(int(v) for v in values)


def synthetic_dataset(task: str, *, lengths: Sequence[int], num_samples: int, seed: int,
                      tokenizer, depths: Sequence[float] | None = None,
                      **options) -> grain.MapDataset:
    """Records of `task` for every length (x depth when `depths` is given) x sample.

    Element order: length-major, then depth, then sample (index = sample), so the records of
    one length are contiguous. `depths` is for depth-taking tasks (passkey, niah, the
    InfiniteBench retrieval tasks). For a session task (SESSIONS) an element is the session's
    tuple of turn records. Several tasks go into one dataset with
    `grain.MapDataset.concatenate`.
    """
    if task not in GENERATORS and task not in SESSIONS:
        raise ValueError(f"task={task!r}; expected one of {sorted(GENERATORS)} or a session "
                         f"task {sorted(SESSIONS)}")
    lengths = _positive_ints("lengths", lengths)
    (num_samples,) = _positive_ints("num_samples", (num_samples,))
    depth_axis = (None,) if depths is None else tuple(float(d) for d in depths)
    if not depth_axis:
        raise ValueError("depths=(); expected None or at least one depth")
    make = GENERATORS[task] if task in GENERATORS else SESSIONS[task]
    per_length = len(depth_axis) * num_samples

    def element(i):
        length = lengths[i // per_length]
        depth = depth_axis[(i % per_length) // num_samples]
        extra = {} if depth is None else {"depth": depth}
        return make(i % num_samples, seed=seed, length=length, tokenizer=tokenizer,
                    **extra, **options)

    return grain.MapDataset.range(len(lengths) * per_length).map(element)

