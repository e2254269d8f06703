"""LRA ListOps: nested MIN / MAX / MED / SM (sum mod 10) expressions over digits, answer 0-9.

A port of Long Range Arena's `lra_benchmarks/data/listops.py`: `generate_tree` (a node is a digit
with probability 1 - VALUE_P, else an operator over 2..max_args subtrees; depth at most max_depth),
`to_string` (the left-nested binary form with parentheses, e.g. "( ( ( [MAX 2 ) 9 ) ] )") and
`to_value`, with LRA's defaults (max_depth 10, max_args 10, 500 < length < 2000, length counted
in ListOps symbols: digits, operators and ']'). Trees are drawn until the length is in range, as
LRA does, but from the record's own generator (LRA deduplicates a whole split; records here are
independent pure functions of (seed, index)).

The record's `context` is LRA's `Source` string and `answers` its `Target`; the prompt asks a
language model for the value (one digit, exact match).
"""

from __future__ import annotations

import numpy as np

from lcm.data.fit import task_rng
from lcm.data.records import Record, record_id
from lcm.data.tokenizers import tokenizer_name

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUE_P = 0.25
INSTRUCTION = ("Evaluate the ListOps expression. [MIN, [MAX, [MED and [SM (sum modulo 10) apply to "
               "the values up to their closing ']'; the answer is one digit.\n\n")


def generate_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int):
    """(tree, length) as LRA's generate_tree, drawing from `rng`."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return int(rng.integers(10)), 1
    length = 2
    values = []
    for _ in range(int(rng.integers(2, max_args + 1))):
        sub, sub_length = generate_tree(rng, depth + 1, max_depth, max_args)
        values.append(sub)
        length += sub_length
    tree = (OPERATORS[int(rng.integers(len(OPERATORS)))], values[0])
    for value in values[1:]:
        tree = (tree, value)
    return (tree, END), length


def to_string(tree) -> str:
    if isinstance(tree, str):
        return tree
    if isinstance(tree, int):
        return str(tree)
    return "( " + to_string(tree[0]) + " " + to_string(tree[1]) + " )"


def to_value(tree):
    """The value of a tree (an int 0..9), evaluated as LRA's to_value does."""
    if not isinstance(tree, tuple):
        return tree
    left, right = to_value(tree[0]), to_value(tree[1])
    if left in OPERATORS:
        return (left, [right])
    if right == END:
        op, args = left
        if op == MIN:
            return min(args)
        if op == MAX:
            return max(args)
        if op == MED:
            return int(np.median(args))
        return int(np.sum(args) % 10)
    return (left[0], left[1] + [right])


def make_listops(index: int, *, seed: int, length: int = 2000, tokenizer=None,
                 min_length: int = 500, max_depth: int = 10, max_args: int = 10,
                 max_tries: int = 100_000) -> Record:
    """ListOps record `index`: a tree with min_length < symbols < length (LRA's max_length).

    `length` here counts ListOps symbols (LRA's unit), not tokenizer tokens; the tokenizer, when
    given, only records the prompt's token count in meta.
    """
    task = "listops"
    if not 2 < min_length + 1 < length:
        raise ValueError(f"min_length={min_length}, length={length}; expected "
                         f"0 <= min_length < length - 1")
    if max_depth < 2 or max_args < 2:
        raise ValueError(f"max_depth={max_depth}, max_args={max_args}; expected both >= 2")
    rng = task_rng(task, seed, index)
    for tries in range(1, max_tries + 1):
        tree, size = generate_tree(rng, 1, max_depth, max_args)
        if min_length < size < length:
            break
    else:
        raise ValueError(f"no ListOps tree with {min_length} < length < {length} in {max_tries} "
                         f"draws (max_depth={max_depth}, max_args={max_args}); widen the range")
    source = to_string(tree)
    prompt = INSTRUCTION + source + "\nAnswer:"
    meta = {"listops_length": size, "tries": tries, "index": index, "seed": seed,
            "max_depth": max_depth, "max_args": max_args}
    if tokenizer is not None:
        meta["num_tokens"] = len(tokenizer.encode(prompt))
        meta["tokenizer"] = tokenizer_name(tokenizer)
    return Record(id=record_id(task, length, index, seed), task=task, context=source,
                  question="", prompt=prompt, answers=(str(to_value(tree)),), length=length,
                  max_new_tokens=2, metric="exact_match", meta=meta)
