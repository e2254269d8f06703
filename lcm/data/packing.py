"""Grain pipelines for training: documents -> FirstFit-packed [batch, seq] batches.

Sources are Grain `MapDataset`s of 1-D int32 token arrays, each a pure function of its index
(so a pipeline shards by process and resumes exactly from its iterator state):

- `text_documents(path, tokenizer)`: a local .jsonl file (one JSON object per line, its "text"
  field) or a .txt file (documents separated by blank lines), tokenized on access.
- `synthetic_documents(seed, ...)`: learnable random documents (a random prefix, then copies of
  it), for smoke tests and CPU runs without data.

`packed_batches(documents, seq_len=..., batch_size=...)` shuffles (reshuffling every epoch),
truncates documents to `seq_len`, packs them first-fit into rows of `seq_len` tokens and batches
them into dicts of int32 [batch_size, seq_len]: `tokens`, `segment_ids` (1, 2, ... per document
in a row, 0 for padding) and `positions` (restarting at 0 per document), the batch format of
`lcm.train.train_step`. Save `iter(...).get_state()` with a checkpoint and `set_state` it to
resume exactly.
"""

from __future__ import annotations

import json
import os

import grain
import grain.experimental
import numpy as np

from lcm.checks import check_int, is_int


def text_documents(path, tokenizer, *, field: str = "text", add_eos: bool = True,
                   shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """Token arrays of the documents in a local .jsonl or .txt file (see the module doc).

    Documents are read eagerly and tokenized on access; `eos_id` (if the tokenizer has one
    and `add_eos`) ends each. `shard_index`/`shard_count` keep every shard_count-th document
    (one shard per process: `jax.process_index()`, `jax.process_count()`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path={path!r} is not a file; expected a local .jsonl or .txt file")
    texts = []
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not JSON ({e})") from e
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise ValueError(f"{path}:{number}: expected an object with a string "
                                     f"field {field!r}")
                texts.append(record[field])
        elif path.endswith(".txt"):
            texts = [d.strip() for d in f.read().split("\n\n") if d.strip()]
        else:
            raise ValueError(f"path={path!r}; expected a .jsonl or .txt file")
    if not texts:
        raise ValueError(f"{path} holds no documents")
    _check_shard(shard_index, shard_count)
    eos = getattr(tokenizer, "eos_id", None) if add_eos else None

    def encode(text):
        ids = list(tokenizer.encode(text)) + ([eos] if eos is not None else [])
        return np.asarray(ids, np.int32)

    return grain.MapDataset.source(texts)[shard_index::shard_count].map(encode)


def synthetic_documents(seed: int, *, vocab_size: int, min_length: int = 16,
                        max_length: int = 128, num_documents: int = 1 << 20,
                        shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """Documents whose tokens are a random prefix of 2-16 tokens repeated to a random length in
    [min_length, max_length]: a model lowers its loss by learning to copy (induction heads).
    Document i depends only on (seed, i)."""
    if not 2 <= min_length <= max_length:
        raise ValueError(f"min_length={min_length}, max_length={max_length}; expected "
                         f"2 <= min_length <= max_length")
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size}; expected >= 2")
    _check_shard(shard_index, shard_count)

    def document(index):
        rng = np.random.default_rng((seed, int(index)))
        length = int(rng.integers(min_length, max_length + 1))
        prefix = rng.integers(0, vocab_size, int(rng.integers(2, 17)))
        return np.resize(prefix, length).astype(np.int32)

    return grain.MapDataset.range(num_documents)[shard_index::shard_count].map(document)


def packed_batches(documents: grain.MapDataset, *, seq_len: int, batch_size: int, seed: int = 0,
                   shuffle: bool = True, num_epochs: int | None = None,
                   num_packing_bins: int | None = None) -> grain.IterDataset:
    """Shuffled, truncated, first-fit-packed batches (see the module doc); `num_epochs=None`
    repeats forever. `num_packing_bins` (default `batch_size`) rows are filled at a time: more
    bins pack tighter."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        check_int(None, name, value, 1)
    seq_len, batch_size = int(seq_len), int(batch_size)
    if not isinstance(documents, grain.MapDataset):
        raise ValueError(f"documents={type(documents).__name__}; expected a grain.MapDataset of "
                         f"1-D int token arrays")
    ds = documents.repeat(num_epochs)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.map(lambda tokens: {"tokens": np.asarray(tokens, np.int32)[:seq_len]})
    ds = ds.filter(lambda x: x["tokens"].size > 0)
    packed = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(), length_struct={"tokens": seq_len},
        num_packing_bins=num_packing_bins or batch_size, seed=seed, shuffle_bins=shuffle)
    return packed.batch(batch_size, drop_remainder=True).map(_rename)


def _rename(batch):
    return {"tokens": batch["tokens"].astype(np.int32),
            "segment_ids": batch["tokens_segment_ids"].astype(np.int32),
            "positions": batch["tokens_positions"].astype(np.int32)}


def _check_shard(shard_index, shard_count):
    if not (is_int(shard_count) and shard_count > 0
            and is_int(shard_index) and 0 <= shard_index < shard_count):
        raise ValueError(f"shard_index={shard_index!r}, shard_count={shard_count!r}; expected "
                         f"0 <= shard_index < shard_count")
