"""Byte-level BPE tokenizers rebuilt from GGUF metadata, with the file's Jinja chat template.

A GGUF carries no `tokenizer.json`: it stores the vocabulary (`tokenizer.ggml.tokens`, already
spelled in GPT-2's byte alphabet), the merges, a type per token (3 = control, 4 = user-defined),
the special ids and the name of a pre-tokenizer (`tokenizer.ggml.pre`). llama.cpp keeps one regex
list per pre-tokenizer name; `_PRE_TOKENIZERS` gives each name the `tokenizers` pipeline of the
Hugging Face tokenizer the file was converted from. The template is rendered as transformers
renders it (sandboxed Jinja, trim_blocks, lstrip_blocks, loop controls, its `tojson`).
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types

# Llama 3's split regex (its tokenizer.json, and llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_byte_level():
    # llama.cpp splits "\p{N}" first, then GPT-2's regex on what is left; SmolLM2's (and
    # StarCoder's) tokenizer.json says the same as Sequence[Digits(individual), ByteLevel].
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


def _llama3():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


# tokenizer.ggml.pre -> the Hugging Face pre-tokenizer it stands for.
_PRE_TOKENIZERS = {
    "smollm": _digits_then_byte_level, "starcoder": _digits_then_byte_level,
    "refact": _digits_then_byte_level, "codeshell": _digits_then_byte_level,
    "gpt2": _byte_level,
    "llama-bpe": _llama3, "llama3": _llama3, "llama-v3": _llama3,
}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte as a printable character (spaces become 'Ġ' etc.)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class GGUFTokenizer:
    """A byte-level BPE tokenizer and chat template, as described by a GGUF file's metadata.

    Control tokens (e.g. `<|im_start|>`) written in the text encode to their single id, as the
    Hugging Face tokenizer does. `encode` adds BOS/EOS only when asked (`add_special_tokens=True`)
    and only where the file's `tokenizer.ggml.add_bos_token` / `add_eos_token` say so.
    """

    def __init__(self, *, tokens, token_types, merges, pre: str, bos_id, eos_id, pad_id=None,
                 unk_id=None, add_bos: bool = False, add_eos: bool = False,
                 chat_template: str | None = None, source: str = "tokenizer"):
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; expected one "
                             f"of {list(SUPPORTED_PRE_TOKENIZERS)}")
        tokens = list(tokens)
        token_types = list(token_types) if token_types is not None else [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries "
                             f"but tokenizer.ggml.tokens has {len(tokens)}")
        for name, value in (("bos_token_id", bos_id), ("eos_token_id", eos_id),
                            ("padding_token_id", pad_id), ("unknown_token_id", unk_id)):
            if value is not None and not 0 <= value < len(tokens):
                raise ValueError(f"{source}: tokenizer.ggml.{name}={value} is outside the "
                                 f"vocabulary of {len(tokens)} tokens")
        alphabet = bytes_to_unicode()
        spelled = set(alphabet.values())
        # A token outside the byte alphabet (a llama.cpp spelling) is re-spelled from its UTF-8.
        vocab = {}
        for i, token in enumerate(tokens):
            key = token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode())
            vocab.setdefault(key, i)
        pairs = []
        for k, merge in enumerate(merges):
            parts = merge.split(" ")
            if len(parts) != 2 or not all(p in vocab for p in parts):
                raise ValueError(f"{source}: tokenizer.ggml.merges[{k}]={merge!r} is not two "
                                 f"vocabulary tokens separated by a space")
            pairs.append((parts[0], parts[1]))
        try:
            bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, fuse_unk=False,
                             continuing_subword_prefix="", end_of_word_suffix="")
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"{source}: tokenizers could not build the BPE model ({e})") from e
        tk = tokenizers.Tokenizer(bpe)
        tk.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        tk.decoder = decoders.ByteLevel()
        # Control tokens spelled outside the byte alphabet are llama.cpp mislabels (transformers
        # skips them too); user-defined tokens are matched whole but are not special.
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, kind in zip(tokens, token_types)
                               if kind == _CONTROL and set(t) <= spelled])
        tk.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, kind in zip(tokens, token_types)
                       if kind == _USER_DEFINED and t in vocab])
        self._tk, self._tokens, self._source = tk, tokens, source
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.pre = pre
        self.chat_template = chat_template
        self._template = None

    def __repr__(self):
        return (f"GGUFTokenizer(vocab_size={self.vocab_size}, pre={self.pre!r}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id})")

    def token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id as the file spells it; None for None."""
        return None if token_id is None else self._tokens[token_id]

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """text -> token ids. Special tokens written in the text map to their single ids."""
        if not isinstance(text, str):
            raise ValueError(f"text is a {type(text).__name__}; expected a str")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids
            ids = ids + ([self.eos_id] if self.add_eos and self.eos_id is not None else [])
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """token ids -> text; invalid UTF-8 byte runs become U+FFFD."""
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"ids: shape {array.shape}, dtype {array.dtype}; expected a 1-D "
                             f"sequence of ints")
        ids = array.astype(np.int64).tolist()
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"ids {bad[:8]} are outside the vocabulary of {self.vocab_size}")
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the file's template.

        Extra keyword arguments reach the template as variables (as in transformers); the special
        tokens are there as `bos_token`, `eos_token`, `unk_token` and `pad_token`.
        """
        if self.chat_template is None:
            raise ValueError(f"{self._source}: the file has no tokenizer.chat_template")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict)
                                                               for m in messages):
            raise ValueError(f"messages={messages!r}; expected a list of dicts with 'role' and "
                             f"'content'")
        if self._template is None:
            self._template = _compile(self.chat_template)
        variables = {"bos_token": self.token(self.bos_id), "eos_token": self.token(self.eos_id),
                     "unk_token": self.token(self.unk_id), "pad_token": self.token(self.pad_id),
                     **kwargs}
        return self._template.render(messages=list(messages),
                                     add_generation_prompt=add_generation_prompt, **variables)


def _compile(template: str):
    """A sandboxed Jinja template with the environment transformers gives chat templates."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"tokenizer.chat_template is not a valid Jinja template ({e})") from e
