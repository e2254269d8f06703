"""Haystack text and needle values that ship with lcm (nothing is downloaded).

* `NOISE`: the repeated filler of the passkey test (Landmark/LongLoRA) and RULER's noise haystack.
* `essay_words(n)`: the first n words of a generated English-like essay standing in for RULER's
  and gkamradt's Paul Graham essays (not redistributable). It is a fixed text: sentences from a
  small grammar over the word lists of the `wonderwords` package (the lists RULER draws its word
  keys from), made by a generator seeded once, so it never depends on a record's seed.
  `ESSAY_VERSION` names it in results; change it whenever the text changes.
* random values as RULER draws them: 7-digit numbers, adjective-noun words, uuid4 strings.
"""

from __future__ import annotations

import functools
import re
import uuid

import numpy as np
import wonderwords.random_word as _ww

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")
ESSAY_VERSION = "lcm-essay-v1"
_ESSAY_SEED = 20240101
_CHUNK_SENTENCES = 4096


@functools.cache
def word_lists() -> dict[str, tuple[str, ...]]:
    """wonderwords' nouns, adjectives and verbs (lower-case, letters only, no profanity,
    sorted)."""
    out = {}
    for kind, file in (("nouns", "nounlist.txt"), ("adjectives", "adjectivelist.txt"),
                       ("verbs", "verblist.txt")):
        words = _ww._get_words_from_text_file(file)
        out[kind] = tuple(sorted({w for w in words
                                  if re.fullmatch(r"[a-z]+", w) and not _ww.is_profanity(w)}))
    return out


_OPENERS = ("In my experience", "For most people", "Over the years", "As a rule",
            "Surprisingly", "In practice", "At first", "Looking back", "Oddly enough",
            "In the long run", "Most of the time", "By contrast")
_TEMPLATES = (
    "{opener}, the {adj} {noun} matters more than the {noun2}.",
    "It is hard to {verb} a {adj} {noun} without a {noun2}.",
    "{opener}, people who {verb} the {noun} end up with a {adj} {noun2}.",
    "The best way to {verb} a {noun} is to start with a {adj} {noun2}.",
    "Nobody plans to {verb} the {noun}, but the {adj} {noun2} makes it happen.",
    "{opener}, a {adj} {noun} is what you get when you {verb} the {noun2}.",
    "If you want to {verb} the {noun}, you should ask a {adj} {noun2} first.",
    "What surprised me most was how {adj} the {noun} felt next to the {noun2}.",
    "A {noun} that you cannot {verb} is rarely worth a {adj} {noun2}.",
    "{opener}, the question is not whether to {verb} the {noun} but when.",
    "Every {adj} {noun} I have seen began as a small {noun2}.",
    "The {noun} was {adj}, and that was enough to {verb} the {noun2}.",
)


@functools.cache
def _essay_chunk(chunk: int) -> tuple[str, ...]:
    """Sentences [chunk * 4096, (chunk + 1) * 4096) of the essay (each chunk seeded alone)."""
    rng = np.random.default_rng([_ESSAY_SEED, chunk])
    lists = word_lists()
    nouns, adjs, verbs = lists["nouns"], lists["adjectives"], lists["verbs"]
    out = []
    for _ in range(_CHUNK_SENTENCES):
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        out.append(template.format(
            opener=_OPENERS[rng.integers(len(_OPENERS))], adj=adjs[rng.integers(len(adjs))],
            noun=nouns[rng.integers(len(nouns))], noun2=nouns[rng.integers(len(nouns))],
            verb=verbs[rng.integers(len(verbs))]))
    return tuple(re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", s) for s in out)


@functools.cache
def _essay_word_chunk(chunk: int) -> tuple[str, ...]:
    return tuple(" ".join(_essay_chunk(chunk)).split(" "))


def essay_words(n: int) -> list[str]:
    """The first n words of the essay (as RULER splits its essay on whitespace)."""
    if n < 0:
        raise ValueError(f"n={n}; expected >= 0")
    words, chunk = [], 0
    while len(words) < n:
        words.extend(_essay_word_chunk(chunk))
        chunk += 1
    return words[:n]


def split_sentences(text: str) -> list[str]:
    """Sentences of a haystack text: split after '.', '!' or '?' followed by whitespace (what
    NLTK's sent_tokenize does on text without abbreviations, as the shipped texts are)."""
    text = text.strip()
    return re.split(r"(?<=[.!?])\s+", text) if text else []


def random_number(rng: np.random.Generator, num_digits: int = 7) -> str:
    return str(int(rng.integers(10 ** (num_digits - 1), 10 ** num_digits)))


def random_word(rng: np.random.Generator) -> str:
    """An adjective-noun pair, e.g. 'quiet-harbor' (RULER's word keys)."""
    lists = word_lists()
    adjs, nouns = lists["adjectives"], lists["nouns"]
    return f"{adjs[rng.integers(len(adjs))]}-{nouns[rng.integers(len(nouns))]}"


def random_uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))


RANDOM_VALUES = {"numbers": random_number, "words": random_word, "uuids": random_uuid}


def random_value(kind: str, rng: np.random.Generator) -> str:
    if kind not in RANDOM_VALUES:
        raise ValueError(f"needle type {kind!r}; expected one of {sorted(RANDOM_VALUES)}")
    return RANDOM_VALUES[kind](rng)
