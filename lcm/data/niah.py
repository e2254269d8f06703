"""Needle in a haystack: RULER's eight NIAH tasks, and a length x depth grid with fixed depths.

Both build RULER's prompt (`scripts/data/synthetic/niah.py` and `constants.py`): needles
`One of the special magic {type_needle_v} for {key} is: {value}.` hidden in a haystack of essay
sentences, noise sentences or distractor needles, then the question and RULER's answer prefix
(singular wording when one value is asked for, as RULER rewrites its template). The haystack size
is fitted per record to the token budget (`lcm.data.fit`).

Where lcm differs from RULER: the haystack essay is lcm's generated essay (`haystack.py`), not
Paul Graham's; random draws come from the record's own generator, so a record is a pure function
of (task, seed, index, length, tokenizer); RULER's sentence splitter (NLTK) is replaced by a
splitter that agrees with it on the shipped text.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lcm.data.fit import check_budget, fit_largest, task_rng
from lcm.data.haystack import ESSAY_VERSION, NOISE, essay_words, random_value, split_sentences
from lcm.data.records import Record, record_id
from lcm.data.tokenizers import tokenizer_name

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure "
            "to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the provided "
            "text?")
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
MAX_NEW_TOKENS = 128
# RULER draws essay depths (in percent) from these 40 values without replacement.
RULER_DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))
HAYSTACKS = ("noise", "essay", "needle")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NiahSpec:
    """One NIAH task, as a RULER `synthetic.yaml` entry describes it."""

    haystack: str
    type_needle_k: str = "words"
    type_needle_v: str = "numbers"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1

    def __post_init__(self):
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack={self.haystack!r}; expected one of {list(HAYSTACKS)}")
        for name in ("type_needle_k", "type_needle_v"):
            if getattr(self, name) not in ("numbers", "words", "uuids"):
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of "
                                 f"['numbers', 'uuids', 'words']")
        for name in ("num_needle_k", "num_needle_v", "num_needle_q"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected >= 1")
        # RULER: num_needle_k = max(num_needle_k, num_needle_q).
        object.__setattr__(self, "num_needle_k", max(self.num_needle_k, self.num_needle_q))


RULER_NIAH = {
    "niah_single_1": NiahSpec(haystack="noise"),
    "niah_single_2": NiahSpec(haystack="essay"),
    "niah_single_3": NiahSpec(haystack="essay", type_needle_v="uuids"),
    "niah_multikey_1": NiahSpec(haystack="essay", num_needle_k=4),
    "niah_multikey_2": NiahSpec(haystack="needle"),
    "niah_multikey_3": NiahSpec(haystack="needle", type_needle_k="uuids", type_needle_v="uuids"),
    "niah_multivalue": NiahSpec(haystack="essay", num_needle_v=4),
    "niah_multiquery": NiahSpec(haystack="essay", num_needle_q=4),
}


@dataclasses.dataclass(frozen=True)
class _Draw:
    """Everything a NIAH record draws before its haystack size is known."""

    keys: list
    values: list
    needles: list
    depths: list          # per needle, in [0, 1]
    query_keys: list
    answers: list
    distractor_seed: int


def _draw(spec: NiahSpec, rng: np.random.Generator, depths) -> _Draw:
    keys, values, needles = [], [], []
    for _ in range(spec.num_needle_k):
        keys.append(random_value(spec.type_needle_k, rng))
        values.append([random_value(spec.type_needle_v, rng) for _ in range(spec.num_needle_v)])
        needles += [NEEDLE.format(type_needle_v=spec.type_needle_v, key=keys[-1], value=v)
                    for v in values[-1]]
    # RULER shuffles the needles, then places them at sorted depths.
    needles = [needles[i] for i in rng.permutation(len(needles))]
    if depths is None:
        if spec.haystack == "essay":
            depths = sorted(d / 100 for d in rng.choice(RULER_DEPTHS, len(needles), replace=False))
        else:
            depths = sorted(float(u) for u in rng.random(len(needles)))
    queried = rng.choice(spec.num_needle_k, spec.num_needle_q, replace=False)
    return _Draw(keys=keys, values=values, needles=needles, depths=list(depths),
                 query_keys=[keys[i] for i in queried],
                 answers=[a for i in queried for a in values[i]],
                 distractor_seed=int(rng.integers(2**63)))


def _context(spec: NiahSpec, draw: _Draw, num_haystack: int) -> str:
    if spec.haystack == "essay":
        sentences = split_sentences(" ".join(essay_words(num_haystack)))
        cuts = [0] + [int(len(sentences) * d) for d in draw.depths] + [len(sentences)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(draw.needles):
                parts.append(draw.needles[i - 1])
        return " ".join(parts)
    if spec.haystack == "noise":
        lines = [NOISE] * num_haystack
    else:  # distractor needles, drawn from their own stream so a prefix never changes with n
        rng = np.random.default_rng(draw.distractor_seed)
        lines = [NEEDLE.format(type_needle_v=spec.type_needle_v,
                               key=random_value(spec.type_needle_k, rng),
                               value=random_value(spec.type_needle_v, rng))
                 for _ in range(num_haystack)]
    # Insert from the deepest needle up, as RULER does (positions sorted in reverse).
    for depth, needle in sorted(zip(draw.depths, draw.needles), reverse=True):
        lines.insert(int(depth * num_haystack), needle)
    return "\n".join(lines)


def _wording(spec: NiahSpec) -> tuple[str, str, str]:
    """(template, answer prefix, type_needle_v) with RULER's singular rewrite when q * v == 1."""
    template, prefix, kind = TEMPLATE, ANSWER_PREFIX, spec.type_needle_v
    if spec.num_needle_q * spec.num_needle_v == 1:
        def singular(text):
            for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"),
                             ("answers", "answer")):
                text = text.replace(old, new)
            return text
        template, prefix, kind = singular(template), singular(prefix), kind[:-1]
    return template, prefix, kind


def niah_record(task: str, spec: NiahSpec, index: int, *, seed: int, length: int, tokenizer,
                depths=None, max_new_tokens: int = MAX_NEW_TOKENS, reserve_tokens: int = 0,
                template: str = "{task_template}", id_extra: dict | None = None) -> Record:
    """A NIAH record; `depths` (one per needle, in [0, 1]) fixes where the needles go."""
    budget = check_budget(task, length, max_new_tokens, reserve_tokens)
    if "{task_template}" not in template:
        raise ValueError(f"template={template!r}; expected a format string with {{task_template}}")
    draw = _draw(spec, task_rng(task, seed, index), depths)
    task_template, answer_prefix, kind = _wording(spec)
    query = (", ".join(draw.query_keys[:-1]) + ", and " + draw.query_keys[-1]
             if len(draw.query_keys) > 1 else draw.query_keys[0])

    def build(n):
        context = _context(spec, draw, n)
        body = task_template.format(type_needle_v=kind, context=context, query=query)
        return (template.format(task_template=body)
                + answer_prefix.format(type_needle_v=kind, query=query)), context

    num_haystack, num_tokens = fit_largest(lambda n: len(tokenizer.encode(build(n)[0])), budget,
                                           what=f"{task} at length={length}")
    prompt, context = build(num_haystack)
    question = task_template.split("\n")[-1].format(type_needle_v=kind, query=query)
    return Record(
        id=record_id(task, length, index, seed, **(id_extra or {})), task=task, context=context,
        question=question, prompt=prompt, answers=tuple(draw.answers), length=length,
        depth=draw.depths[0] if len(draw.depths) == 1 else None, max_new_tokens=max_new_tokens,
        metric="string_match_all",
        meta={"num_tokens": num_tokens, "num_haystack": num_haystack,
              "haystack": ESSAY_VERSION if spec.haystack == "essay" else spec.haystack,
              "depths": draw.depths, "keys": draw.keys, "query_keys": draw.query_keys,
              "answer_prefix": answer_prefix.format(type_needle_v=kind, query=query),
              "tokenizer": tokenizer_name(tokenizer), "index": index, "seed": seed})


def make_ruler_niah(task: str, index: int, *, seed: int, length: int, tokenizer,
                    max_new_tokens: int = MAX_NEW_TOKENS, reserve_tokens: int = 0,
                    template: str = "{task_template}") -> Record:
    """RULER's `task` (one of RULER_NIAH) record `index`, fitted to `length` tokens."""
    if task not in RULER_NIAH:
        raise ValueError(f"task={task!r}; expected one of {sorted(RULER_NIAH)}")
    return niah_record(task, RULER_NIAH[task], index, seed=seed, length=length,
                       tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                       reserve_tokens=reserve_tokens, template=template)


def needle_depths(depth: float, num_needles: int) -> list[float]:
    """gkamradt's multi-needle placement: needle i at depth + i * (1 - depth) / num_needles."""
    return [depth + i * (1.0 - depth) / num_needles for i in range(num_needles)]


def depth_grid(num_depths: int) -> tuple[float, ...]:
    """num_depths evenly spaced depths from 0 to 1 (both ends included)."""
    if num_depths < 1:
        raise ValueError(f"num_depths={num_depths}; expected >= 1")
    if num_depths == 1:
        return (0.5,)
    return tuple(float(d) for d in np.linspace(0.0, 1.0, num_depths))


def make_niah(index: int, *, seed: int, length: int, tokenizer, depth: float,
              num_needles: int = 1, haystack: str = "essay",
              max_new_tokens: int = MAX_NEW_TOKENS, reserve_tokens: int = 0,
              template: str = "{task_template}") -> Record:
    """A needle-in-a-haystack record at a fixed `depth` in [0, 1] (the length x depth grid).

    One key with `num_needles` values (RULER's multivalue wording when more than one); the needles
    sit at `needle_depths(depth, num_needles)`. Scored with string_match_all (share of values
    recalled), a deterministic judge in place of gkamradt's LLM judge.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}; expected a float in [0, 1]")
    if num_needles < 1:
        raise ValueError(f"num_needles={num_needles}; expected >= 1")
    spec = NiahSpec(haystack=haystack, num_needle_v=num_needles)
    task = "niah" if num_needles == 1 else f"niah_{num_needles}needles"
    record = niah_record(task, spec, index, seed=seed, length=length, tokenizer=tokenizer,
                         depths=needle_depths(depth, num_needles), max_new_tokens=max_new_tokens,
                         reserve_tokens=reserve_tokens, template=template,
                         id_extra={"depth": round(float(depth), 6)})
    return dataclasses.replace(record, depth=float(depth))
