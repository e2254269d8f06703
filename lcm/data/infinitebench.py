"""InfiniteBench's regenerable retrieval tasks: passkey, number_string and kv_retrieval.

Ports of `data/construct_synthetic_dataset.py` (`build_passkey`, `build_number_string`,
`build_kv_retrieval`) with the prompts InfiniteBench uses for open models
(`src/prompt.py`, `yarn_mistral_templates`) and its generation budgets (passkey 6,
number_string 12, kv_retrieval 50) and scorers (`lcm.eval.metrics.first_int_match`,
`kv_retrieval_match`).

* passkey / number_string: noise lines "The grass is green. ... again.\\n" before and after the
  information line; the key is 5 random digits (number_string: then 5 digits duplicated in place,
  10 digits). InfiniteBench fixes the noise count per nominal length (326 lines at 8k, ...) and
  sweeps the information line through it; lcm fits the count to the token budget and places the
  line at `depth` (given, or drawn).
* kv_retrieval: a JSON object of uuid4 keys and values (lost-in-the-middle's data, which
  InfiniteBench downloads, drawn here instead); the asked key sits at `depth` among as many pairs
  as fit.
"""

from __future__ import annotations

import uuid

import numpy as np

from lcm.data.fit import check_budget, fit_largest, task_rng
from lcm.data.haystack import NOISE
from lcm.data.records import Record, record_id
from lcm.data.tokenizers import tokenizer_name

NOISE_LINE = NOISE + "\n"
TASKS = {
    "infinitebench/passkey": dict(
        info="The pass key is {key}. Remember it. {key} is the pass key.\n",
        question="What is the pass key?", max_new_tokens=6, metric="first_int_match",
        template="There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information.\n\n{context}\n\n"
                 "{input}\n\nThe pass key is"),
    "infinitebench/number_string": dict(
        info="The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n",
        question="What is the sequence of digits?", max_new_tokens=12, metric="first_int_match",
        template="There is an important info hidden inside a lot of irrelevant text. Find it. I "
                 "will quiz you about the important information there.\n\n{context}\n\n{input}"
                 "\n\nThe sequence of digits is"),
    "infinitebench/kv_retrieval": dict(
        max_new_tokens=50, metric="kv_retrieval_match",
        template="Extract the value corresponding to the specified key in the JSON object below."
                 "\n\n{context}\n\n{input}"),
}


def _digits(rng, number_string: bool) -> str:
    keys = [str(int(d)) for d in rng.integers(0, 10, 5)]
    if number_string:
        for k in range(5):  # build_number_string: duplicate a digit in place, five times
            pos = int(rng.integers(0, 5 + k))
            keys.insert(pos, keys[pos])
    return "".join(keys)


def _finish(task, index, seed, length, tokenizer, depth, id_depth, prompt, context, question,
            answer, num_tokens, **meta):
    spec = TASKS[task]
    return Record(
        id=record_id(task, length, index, seed, **({} if id_depth is None else
                                                   {"depth": id_depth})),
        task=task, context=context, question=question, prompt=prompt, answers=(answer,),
        length=length, depth=depth, max_new_tokens=spec["max_new_tokens"],
        metric=spec["metric"],
        meta={"num_tokens": num_tokens, "tokenizer": tokenizer_name(tokenizer), "index": index,
              "seed": seed, **meta})


def _retrieval(task, index, *, seed, length, tokenizer, depth, reserve_tokens, template):
    spec = TASKS[task]
    budget = check_budget(task, length, spec["max_new_tokens"], reserve_tokens)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}; expected None (random) or a float in [0, 1]")
    rng = task_rng(task, seed, index)
    key = _digits(rng, task.endswith("number_string"))
    drawn = float(rng.random()) if depth is None else float(depth)
    info = spec["info"].format(key=key)

    def build(n):
        before = round(drawn * n)
        context = NOISE_LINE * before + info + NOISE_LINE * (n - before)
        body = spec["template"].format(context=context, input=spec["question"])
        return template.format(task_template=body), context

    n, num_tokens = fit_largest(lambda n: len(tokenizer.encode(build(n)[0])), budget,
                                what=f"{task} at length={length}")
    prompt, context = build(n)
    return _finish(task, index, seed, length, tokenizer, drawn, depth, prompt, context,
                   spec["question"], key, num_tokens, num_noise=n)


def make_infinitebench_passkey(index: int, *, seed: int, length: int, tokenizer,
                               depth: float | None = None, reserve_tokens: int = 0,
                               template: str = "{task_template}") -> Record:
    """InfiniteBench passkey: a 5-digit key among noise lines, fitted to `length` tokens."""
    return _retrieval("infinitebench/passkey", index, seed=seed, length=length,
                      tokenizer=tokenizer, depth=depth, reserve_tokens=reserve_tokens,
                      template=template)


def make_number_string(index: int, *, seed: int, length: int, tokenizer,
                       depth: float | None = None, reserve_tokens: int = 0,
                       template: str = "{task_template}") -> Record:
    """InfiniteBench number_string: a 10-digit sequence with repeats among noise lines."""
    return _retrieval("infinitebench/number_string", index, seed=seed, length=length,
                      tokenizer=tokenizer, depth=depth, reserve_tokens=reserve_tokens,
                      template=template)


def make_kv_retrieval(index: int, *, seed: int, length: int, tokenizer,
                      depth: float | None = None, reserve_tokens: int = 0,
                      template: str = "{task_template}") -> Record:
    """InfiniteBench kv_retrieval: the value of one uuid key of a JSON object of uuid pairs."""
    task = "infinitebench/kv_retrieval"
    spec = TASKS[task]
    budget = check_budget(task, length, spec["max_new_tokens"], reserve_tokens)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}; expected None (random) or a float in [0, 1]")
    rng = task_rng(task, seed, index)
    drawn = float(rng.random()) if depth is None else float(depth)
    stream = np.random.default_rng(int(rng.integers(2**63)))
    pairs: list[tuple[str, str]] = []

    def pairs_upto(n):  # one stream, so the first n pairs never change with n
        while len(pairs) < n:
            k, v = (str(uuid.UUID(int=int.from_bytes(stream.bytes(16), "big"), version=4))
                    for _ in range(2))
            pairs.append((k, v))
        return pairs[:n]

    def build(n):
        kv = pairs_upto(n)
        context = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in kv) + "}"
        ask = min(int(drawn * n), n - 1)
        question = f'\nKey: "{kv[ask][0]}"\nThe value associated with the specified key is: '
        body = spec["template"].format(context=context, input=question)
        return template.format(task_template=body), context, question, kv[ask][1], ask

    n, num_tokens = fit_largest(lambda n: len(tokenizer.encode(build(n)[0])), budget, lo=1,
                                what=f"{task} at length={length}")
    prompt, context, question, answer, ask = build(n)
    return _finish(task, index, seed, length, tokenizer, drawn, depth, prompt, context,
                   question, answer, num_tokens, num_pairs=n, key_position=ask)
