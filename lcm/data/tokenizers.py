"""Tokenizers for evaluation data: a built-in byte-level one, any Hugging Face `tokenizers` JSON,
and whatever tokenizer a loaded model ships (e.g. `lcm.io.load_smollm2()`'s `GGUFTokenizer`).

Generators only need `encode(text) -> list[int]` (to fit a prompt to a token budget) and pipelines
`encode`, `decode` and a pad id; `get_tokenizer` turns a name, a path or an object into that.
`tokenizer_name` gives the string recorded in results, so a number says which tokenizer it was
measured with (RULER's data, and so its scores, depend on the tokenizer).
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, runtime_checkable

import numpy as np
import tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    """What lcm.data uses of a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS 256, EOS 257 and PAD 258 (vocab_size 259).

    Needs no file, so tests and CPU examples run anywhere; decoding skips the special ids and
    turns invalid UTF-8 into U+FFFD.
    """

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259
    name = "bytes"

    def __repr__(self):
        return "ByteTokenizer()"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text is a {type(text).__name__}; expected a str")
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        array = _ids(ids, self.vocab_size)
        return bytes(array[array < 256].astype(np.uint8).tolist()).decode("utf-8", "replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (a `tokenizer.json`), read from local disk.

    `encode` adds no special tokens (prompts are built as text); `pad_id` is the file's padding
    token, else `eos_id` when given, else 0.
    """

    def __init__(self, path, *, eos_token: str | None = None, pad_token: str | None = None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path!r} does not exist; expected a Hugging Face "
                             f"tokenizer.json")
        try:
            self._tk = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"tokenizer file {path!r} is not a valid tokenizers JSON ({e})") from e
        self.path = path
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._token_id(eos_token, "eos_token")
        padding = self._tk.padding
        self.pad_id = (padding["pad_id"] if padding else
                       self._token_id(pad_token, "pad_token") if pad_token else
                       self.eos_id if self.eos_id is not None else 0)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        self.name = f"hf:{os.path.basename(path)}@{digest}"

    def _token_id(self, token, what):
        if token is None:
            return None
        token_id = self._tk.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what}={token!r} is not in the vocabulary of {self.path!r}")
        return token_id

    def __repr__(self):
        return f"HFTokenizer({self.path!r})"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text is a {type(text).__name__}; expected a str")
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tk.decode(_ids(ids, self.vocab_size).tolist(), skip_special_tokens=True)


def _ids(ids, vocab_size: int) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"ids: shape {array.shape}, dtype {array.dtype}; expected a 1-D "
                         f"sequence of ints")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise ValueError(f"ids outside the vocabulary of {vocab_size}: "
                         f"{array[(array < 0) | (array >= vocab_size)][:8].tolist()}")
    return array


def get_tokenizer(spec) -> Tokenizer:
    """'bytes' -> ByteTokenizer; a path to a tokenizer.json -> HFTokenizer; an object with
    `encode` and `decode` (a model's own tokenizer) is returned as is."""
    if isinstance(spec, str) and spec == "bytes":
        return ByteTokenizer()
    if isinstance(spec, (str, os.PathLike)):
        return HFTokenizer(spec)
    if isinstance(spec, Tokenizer):
        return spec
    raise ValueError(f"tokenizer={spec!r}; expected 'bytes', a path to a Hugging Face "
                     f"tokenizer.json, or an object with encode(text) and decode(ids)")


def tokenizer_name(tokenizer) -> str:
    """The name results record: `tokenizer.name` when it has one, else its repr."""
    name = getattr(tokenizer, "name", None)
    return name if isinstance(name, str) else repr(tokenizer)


def pad_id(tokenizer) -> int:
    """The id used for padding: pad_id, else eos_id, else 0."""
    for attr in ("pad_id", "eos_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))
