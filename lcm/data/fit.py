"""Fitting a generated prompt to an exact token budget, as RULER does.

RULER grows the haystack (words of an essay, repeats of a noise sentence, distractor needles)
until the prompt plus the generation budget would pass `max_seq_length`, by binary search on the
haystack size with the tokenizer in use. lcm searches per record: the largest haystack size `n`
with `tokens(prompt(n)) + max_new_tokens + reserve_tokens <= length`, so every record fills its
budget and none exceeds it (RULER searches once per task and steps a sample down by a fixed
increment when it overflows).
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np


def task_rng(task: str, seed: int, index: int, *extra: int) -> np.random.Generator:
    """The generator a record draws from: a pure function of (task, seed, index, extra)."""
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r}; expected an int >= 0")
    return np.random.default_rng([zlib.crc32(task.encode()), int(seed), int(index), *extra])


def check_budget(task: str, length: int, max_new_tokens: int, reserve_tokens: int) -> int:
    """The prompt's token budget, length - max_new_tokens - reserve_tokens; raises if < 1."""
    for name, value in (("length", length), ("max_new_tokens", max_new_tokens),
                        ("reserve_tokens", reserve_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{task}: {name}={value!r}; expected an int >= 0")
    budget = length - max_new_tokens - reserve_tokens
    if budget < 1:
        raise ValueError(f"{task}: length={length} leaves no room for a prompt after "
                         f"max_new_tokens={max_new_tokens} and reserve_tokens={reserve_tokens}")
    return budget


def fit_largest(cost: Callable[[int], int], budget: int, *, lo: int = 0, what: str = "prompt",
                max_n: int = 10**9) -> tuple[int, int]:
    """(n, cost(n)) for the largest n >= lo with cost(n) <= budget.

    `cost` must be non-decreasing in n (a token count of a prompt that grows with n). Raises a
    ValueError naming `what` when even n = lo is over budget, or when n = max_n still fits (the
    prompt does not grow with n).
    """
    seen: dict[int, int] = {}

    def cached(n):
        if n not in seen:
            seen[n] = cost(n)
        return seen[n]

    if cached(lo) > budget:
        raise ValueError(f"{what}: the shortest prompt already takes {seen[lo]} tokens, over "
                         f"the budget of {budget}; use a larger length")
    good, bad = lo, max(2 * lo + 1, 16)
    if cached(bad) <= budget:
        # Linear extrapolation from two probes, then geometric steps to bracket the answer.
        good = bad
        slope = max((seen[good] - seen[lo]) / (good - lo), 1e-9)
        bad = max(good + 1, int(good + (budget - seen[good]) / slope))
        step = max(1, bad // 64)
        while cached(bad) <= budget:
            if bad >= max_n:
                raise ValueError(f"{what}: {bad} haystack units still fit the budget of {budget} "
                                 f"tokens; the prompt does not grow with its haystack")
            good, bad, step = bad, min(bad + step, max_n), 2 * step
    while bad - good > 1:
        mid = (good + bad) // 2
        if cached(mid) <= budget:
            good = mid
        else:
            bad = mid
    return good, seen[good]
