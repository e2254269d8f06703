"""SCBench-style shared-context sessions: one long context, several questions answered from it.

A session is a tuple of Records, one per turn, with the same `context`. Each turn's `prompt` is
`meta["shared_prefix"] + meta["query"]`, so it also runs alone; a cache-reuse evaluation instead
prefills the shared prefix once (possibly compressing that cache without knowing the questions,
the setting query-agnostic KV compression is tested in) and then feeds each turn's query.
Tokenize the two parts separately (`encode(prefix) + encode(query)`): a BPE can merge across the
seam. The budget covers the whole session: prefix tokens + every query + every turn's
max_new_tokens <= length, so a loop that keeps the turns in the cache never overflows.

Tasks (regenerable subsets of SCBench's):
* "scbench_kv" (SCBench Retr.KV): a JSON object of uuid4 pairs; turn t asks the value of a
  different key, keys spread evenly from the front to the back of the object.
* "scbench_niah": RULER-style needles "One of the special magic numbers for {key} is: {value}."
  in lcm's essay; turn t asks for the number of key t.
"""

from __future__ import annotations

import uuid

import numpy as np

from lcm.data.fit import check_budget, fit_largest, task_rng
from lcm.data.haystack import (
    ESSAY_VERSION,
    essay_words,
    random_number,
    random_word,
    split_sentences,
)
from lcm.data.records import Record, record_id
from lcm.data.tokenizers import tokenizer_name

KV_MAX_NEW_TOKENS = 50
NIAH_MAX_NEW_TOKENS = 16
SESSION_TASKS = ("scbench_kv", "scbench_niah")


def _uuid(rng):
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))


def _session(task, index, seed, length, tokenizer, num_turns, build, lo, max_new_tokens,
             metric, reserve_tokens, template, extra_meta):
    """Fit `build(n) -> (prefix, context, queries, answers)` and make the turn records."""
    budget = check_budget(task, length, num_turns * max_new_tokens, reserve_tokens)
    if "{task_template}" not in template or not template.endswith("{task_template}"):
        raise ValueError(f"template={template!r}; expected a format string ending with "
                         f"{{task_template}} (the queries follow the shared prefix)")

    def cost(n):
        prefix, _, queries, _ = build(n)
        prefix = template.format(task_template=prefix)
        return len(tokenizer.encode(prefix)) + sum(len(tokenizer.encode(q)) for q in queries)

    n, num_tokens = fit_largest(cost, budget, lo=lo, what=f"{task} at length={length}")
    prefix, context, queries, answers = build(n)
    prefix = template.format(task_template=prefix)
    prefix_tokens = len(tokenizer.encode(prefix))
    session = record_id(task, length, index, seed)
    return tuple(Record(
        id=f"{session}/turn={t}", task=task, context=context, question=query.strip(),
        prompt=prefix + query, answers=(answer,), length=length, max_new_tokens=max_new_tokens,
        metric=metric,
        meta={"session": session, "turn": t, "num_turns": num_turns, "shared_prefix": prefix,
              "query": query, "prefix_tokens": prefix_tokens, "num_tokens": num_tokens,
              "tokenizer": tokenizer_name(tokenizer), "index": index, "seed": seed,
              "haystack_size": n, **extra_meta})
        for t, (query, answer) in enumerate(zip(queries, answers)))


def make_kv_session(index: int, *, seed: int, length: int, tokenizer, num_turns: int = 4,
                    reserve_tokens: int = 0, template: str = "{task_template}"
                    ) -> tuple[Record, ...]:
    """SCBench Retr.KV: one JSON object of uuid pairs, `num_turns` keys asked in turn."""
    task = "scbench_kv"
    if num_turns < 1:
        raise ValueError(f"num_turns={num_turns}; expected >= 1")
    rng = task_rng(task, seed, index)
    stream = np.random.default_rng(int(rng.integers(2**63)))
    pairs: list[tuple[str, str]] = []

    def build(n):
        while len(pairs) < n:
            pairs.append((_uuid(stream), _uuid(stream)))
        kv = pairs[:n]
        context = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in kv) + "}"
        prefix = ("Extract the value corresponding to the specified key in the JSON object "
                  "below.\n\n" + context + "\n\n")
        asked = np.linspace(0, n - 1, num_turns).round().astype(int).tolist()
        queries = [f'Key: "{kv[i][0]}"\nThe value associated with the specified key is: '
                   for i in asked]
        return prefix, context, queries, [kv[i][1] for i in asked]

    return _session(task, index, seed, length, tokenizer, num_turns, build, num_turns,
                    KV_MAX_NEW_TOKENS, "kv_retrieval_match", reserve_tokens, template, {})


def make_niah_session(index: int, *, seed: int, length: int, tokenizer, num_turns: int = 4,
                      reserve_tokens: int = 0, template: str = "{task_template}"
                      ) -> tuple[Record, ...]:
    """Needles for `num_turns` keys spread evenly through the essay; turn t asks for key t."""
    task = "scbench_niah"
    if num_turns < 1:
        raise ValueError(f"num_turns={num_turns}; expected >= 1")
    rng = task_rng(task, seed, index)
    keys: list[str] = []
    while len(keys) < num_turns:
        key = random_word(rng)
        if key not in keys:
            keys.append(key)
    values = [random_number(rng) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    order = rng.permutation(num_turns)  # where each key's needle sits

    def build(n):
        sentences = split_sentences(" ".join(essay_words(n)))
        parts, start = [], 0
        for slot in range(num_turns):
            cut = int(len(sentences) * (slot + 0.5) / num_turns)
            parts += [" ".join(sentences[start:cut]), needles[order[slot]]]
            start = cut
        parts.append(" ".join(sentences[start:]))
        context = " ".join(p for p in parts if p)
        prefix = ("Some special magic numbers are hidden within the following text. Make sure to "
                  "memorize it. I will quiz you about the numbers afterwards.\n" + context + "\n")
        queries = [f"What is the special magic number for {k} mentioned in the provided text? "
                   f"The special magic number for {k} mentioned in the provided text is"
                   for k in keys]
        return prefix, context, queries, values

    return _session(task, index, seed, length, tokenizer, num_turns, build, 0,
                    NIAH_MAX_NEW_TOKENS, "string_match_all", reserve_tokens, template,
                    {"haystack": ESSAY_VERSION})


def flatten_sessions(sessions) -> list[Record]:
    """The turn records of several sessions, in order (e.g. for scoring)."""
    return [record for session in sessions for record in session]
