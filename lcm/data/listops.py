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

`ListOpsEncoder` gives LRA's integer inputs for the classifiers of the LRA papers, restating
`lra_benchmarks/listops/input_pipeline.py`: `rename_close_brackets` (']' -> 'X', parentheses
dropped), a `tfds.deprecated.text.TokenTextEncoder` over the vocabulary (ids 1..15 in vocabulary
order, 0 = padding, 16 = the one OOV bucket; the operators are mixed alphanumeric, so its
Tokenizer keeps them whole and splits the rest on non-alphanumerics), truncation to max_length
(2000) and zero padding (`padded_batch`). LRA's vocabulary order is `list(set(...))` over bytes
tokens, which Python salts per process: its ids are fixed only under a fixed PYTHONHASHSEED.
`LRA_VOCAB` is the order its code gives with PYTHONHASHSEED=0 (checked against TensorFlow
Datasets' encoder by `tests/fixtures/listops_lra/make_fixture.py`); pass the vocabulary of a
run you need to match.

`read_lra_listops` reads LRA's own ListOps TSV files from local disk into the same records.
`listops_examples` / `listops_batches` are the Grain pipeline for classifiers: records (generated
or read) -> LRA's {"inputs", "targets"} examples -> static-shape batches split over processes,
resumable from the iterator's state.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re

import grain
import numpy as np

from lcm.checks import is_int
from lcm.data.fit import task_rng
from lcm.data.pipeline import processes
from lcm.data.records import Record, record_id
from lcm.data.tokenizers import tokenizer_name

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUE_P = 0.25
# The 15 symbols of LRA's inputs after rename_close_brackets, in the order LRA's
# `list(set(vocab_set))` gives under PYTHONHASHSEED=0 (see the module docstring).
LRA_VOCAB = ("7", "[MED", "X", "9", "[MAX", "2", "0", "8", "5", "4", "6", "[MIN", "1", "3", "[SM")
PAD_ID = 0
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
    meta = {"listops_length": size, "tries": tries, "index": index, "seed": seed,
            "max_depth": max_depth, "max_args": max_args}
    return _record(record_id(task, length, index, seed), to_string(tree), to_value(tree),
                   length, meta, tokenizer)


def _record(id_: str, source: str, value: int, length: int, meta: dict, tokenizer) -> Record:
    prompt = INSTRUCTION + source + "\nAnswer:"
    if tokenizer is not None:
        meta["num_tokens"] = len(tokenizer.encode(prompt))
        meta["tokenizer"] = tokenizer_name(tokenizer)
    return Record(id=id_, task="listops", context=source, question="", prompt=prompt,
                  answers=(str(value),), length=length, max_new_tokens=2, metric="exact_match",
                  meta=meta)


def read_lra_listops(path, *, tokenizer=None, length: int = 2000) -> list[Record]:
    """Records from one of LRA's ListOps files (`basic_train.tsv`, `basic_val.tsv`,
    `basic_test.tsv`: a `Source<TAB>Target` header, then one expression and its value 0-9 per
    line), in file order; ids 'listops/lra/<file name>/line=<n>'. `length` is the records'
    length key (LRA's max_length). A missing file, a bad header or a bad line raises ValueError
    naming the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    name = os.path.basename(path)
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.reader(f, delimiter="\t"), start=1):
            if number == 1:
                if row != ["Source", "Target"]:
                    raise ValueError(f"{path}, line 1: header {row!r}; expected LRA's "
                                     f"['Source', 'Target']")
                continue
            if not row:
                continue
            if len(row) != 2 or not row[1].strip().isdigit() or int(row[1]) > 9 \
                    or not row[0].strip():
                raise ValueError(f"{path}, line {number}: {row!r:.80}; expected an expression "
                                 f"and a value 0-9 separated by a tab")
            source = row[0].strip()
            meta = {"file": name, "line": number,
                    "listops_length": len(lra_source(source).split())}
            records.append(_record(f"listops/lra/{name}/line={number}", source, int(row[1]),
                                   length, meta, tokenizer))
    return records


def lra_source(source: str) -> str:
    """LRA's rename_close_brackets: ']' becomes 'X' and parentheses are dropped."""
    return source.replace("]", "X").replace("(", "").replace(")", "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ListOpsEncoder:
    """LRA ListOps ids: `encode(source)` -> list of ids (1.., no padding, at most max_length);
    `encode_batch(sources)` -> int32 [N, max_length], 0-padded. vocab: the token order (LRA's
    ids are 1 + the index); tokens outside it get the OOV id len(vocab) + 1."""

    vocab: tuple[str, ...] = LRA_VOCAB
    max_length: int = 2000

    def __post_init__(self):
        if (not isinstance(self.vocab, tuple) or not self.vocab
                or len(set(self.vocab)) != len(self.vocab)
                or any(not isinstance(t, str) or not t.strip() for t in self.vocab)):
            raise ValueError(f"ListOpsEncoder(vocab={self.vocab!r}); expected a tuple of "
                             f"distinct non-empty tokens")
        if not is_int(self.max_length) or self.max_length <= 0:
            raise ValueError(f"ListOpsEncoder(max_length={self.max_length!r}); expected a "
                             f"positive int")

    @property
    def vocab_size(self) -> int:
        """Padding, the vocabulary and one OOV bucket, as TokenTextEncoder.vocab_size."""
        return len(self.vocab) + 2

    def tokenize(self, text: str) -> list[str]:
        """TokenTextEncoder's Tokenizer: vocabulary tokens that mix alphanumeric and other
        characters (the operators) are kept whole; the rest is split on non-alphanumerics."""
        words = [t.strip() for t in self.vocab]
        reserved = [t for t in words if len([p for p in re.split(r"(\W+)", t) if p]) > 1]
        parts = (re.split("(" + "|".join(re.escape(t) for t in reserved) + ")", text)
                 if reserved else [text])
        tokens = []
        for part in parts:
            tokens.extend([part] if part in reserved else re.split(r"\W+", part))
        return [t for t in tokens if t]

    def encode(self, source: str) -> list[int]:
        """The ids of an LRA `Source` string (as make_listops's record.context)."""
        ids = {t.strip(): i + 1 for i, t in enumerate(self.vocab)}
        oov = len(self.vocab) + 1
        return [ids.get(t, oov) for t in self.tokenize(lra_source(source))][:self.max_length]

    def encode_batch(self, sources) -> np.ndarray:
        out = np.full((len(sources), self.max_length), PAD_ID, np.int32)
        for row, source in enumerate(sources):
            ids = self.encode(source)
            out[row, :len(ids)] = ids
        return out


def listops_examples(records, *, encoder: ListOpsEncoder = ListOpsEncoder()) -> grain.MapDataset:
    """LRA's ListOps examples from ListOps records (`make_listops`, `read_lra_listops`, or a
    `grain.MapDataset` of them): element i is {"inputs": int32 [max_length] (0-padded ids),
    "targets": int32 (the value 0-9)}, as LRA's input pipeline gives them."""
    source = records if isinstance(records, grain.MapDataset) else grain.MapDataset.source(
        list(records))

    def example(record):
        return {"inputs": encoder.encode_batch([record.context])[0],
                "targets": np.int32(_target(record))}

    return source.map(example)


def listops_batches(records, *, batch_size: int,
                    encoder: ListOpsEncoder = ListOpsEncoder(), process_index: int | None = None,
                    process_count: int | None = None) -> grain.MapDataset:
    """Batches of LRA ListOps examples, every record exactly once: element k holds this
    process's rows of global batch k (records k * batch_size ...), as `lcm.data.batch_dataset`
    splits its batches: {"inputs": int32 [b, max_length], "targets": int32 [b], "valid": bool
    [b] (False on the last batch's padding rows, whose inputs are all 0), "indices": int64 [b]
    (-1 for padding)}, b = batch_size / process_count. Random access, so its iterator's state
    `{'next_index': k}` resumes exactly. Process index and count default to JAX's."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an int >= 1")
    process_index, process_count = processes(process_index, process_count)
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size}; expected a multiple of process_count="
                         f"{process_count}")
    source = records if isinstance(records, grain.MapDataset) else grain.MapDataset.source(
        list(records))
    share = batch_size // process_count
    total = len(source)

    def batch(k):
        start = k * batch_size + process_index * share
        indices = np.arange(start, start + share)
        indices[indices >= total] = -1
        mine = [source[int(i)] for i in indices if i >= 0]
        inputs = np.zeros((share, encoder.max_length), np.int32)
        inputs[:len(mine)] = encoder.encode_batch([r.context for r in mine])
        targets = np.zeros(share, np.int32)
        targets[:len(mine)] = [_target(r) for r in mine]
        return {"inputs": inputs, "targets": targets, "valid": indices >= 0, "indices": indices}

    return grain.MapDataset.range(-(-total // batch_size)).map(batch)


def _target(record) -> int:
    if record.task != "listops" or len(record.answers) != 1 or record.answers[0] not in \
            tuple("0123456789"):
        raise ValueError(f"record {record.id!r} (task {record.task!r}, answers "
                         f"{record.answers!r}); expected a ListOps record with one answer 0-9")
    return int(record.answers[0])
