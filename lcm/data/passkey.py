"""Passkey retrieval, the Landmark Attention / LongLoRA text, one pinned variant.

The prompt is five lines joined by "\\n": the task description, a prefix of the filler, the
information line `The pass key is {k}. Remember it. {k} is the pass key.`, a filler suffix, and
`What is the pass key? The pass key is`. As in Landmark's `generate_prompt` (and LongLoRA's
`generate_prompt_landmark`) both filler parts are cut, in characters, from the start of the filler
sentence repeated and joined by spaces, and the key is uniform in 1..50000.

Pinned here (the copies differ): the key range 1..50000; the depth (the prefix's share of the
filler characters) is given, or else uniform in [0, 1] from the record's generator; the filler's
character count is the largest whose prompt fits `length - max_new_tokens - reserve_tokens` tokens
of the tokenizer in use (the copies instead fix a character count per nominal length).
The answer is the key as a decimal string; score by exact match of the first number generated.
"""

from __future__ import annotations

from lcm.data.fit import check_budget, fit_largest, task_rng
from lcm.data.haystack import NOISE
from lcm.data.records import Record, record_id
from lcm.data.tokenizers import tokenizer_name

TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                    "and memorize them. I will quiz you about the important information there.")
FINAL_QUESTION = "What is the pass key? The pass key is"
QUESTION = "What is the pass key?"
MAX_NEW_TOKENS = 16
KEY_RANGE = (1, 50000)


def _filler(num_chars: int) -> str:
    repeats = num_chars // (len(NOISE) + 1) + 1
    return " ".join([NOISE] * repeats)[:num_chars]


def passkey_prompt(pass_key: int, num_chars: int, depth: float) -> tuple[str, str]:
    """(prompt, context) with `num_chars` filler characters, round(depth * num_chars) before
    the information line."""
    prefix = round(depth * num_chars)
    info = f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key."
    context = "\n".join([_filler(prefix), info, _filler(num_chars - prefix)])
    return "\n".join([TASK_DESCRIPTION, context, FINAL_QUESTION]), context


def make_passkey(index: int, *, seed: int, length: int, tokenizer, depth: float | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, reserve_tokens: int = 0,
                 template: str = "{task_template}") -> Record:
    """Passkey record `index`: a pure function of its arguments.

    length: tokens of prompt + generation (+ `reserve_tokens`, e.g. for a chat template added
    later); template: a format string around the prompt (RULER's model templates), fitted too.
    """
    task = "passkey"
    budget = check_budget(task, length, max_new_tokens, reserve_tokens)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}; expected None (random) or a float in [0, 1]")
    if "{task_template}" not in template:
        raise ValueError(f"template={template!r}; expected a format string with {{task_template}}")
    rng = task_rng(task, seed, index)
    pass_key = int(rng.integers(KEY_RANGE[0], KEY_RANGE[1] + 1))
    drawn = float(rng.random()) if depth is None else float(depth)

    def build(n):
        prompt, context = passkey_prompt(pass_key, n, drawn)
        return template.format(task_template=prompt), context

    num_chars, num_tokens = fit_largest(lambda n: len(tokenizer.encode(build(n)[0])), budget,
                                        what=f"passkey at length={length}")
    prompt, context = build(num_chars)
    return Record(
        id=record_id(task, length, index, seed, **({} if depth is None else {"depth": depth})),
        task=task, context=context, question=QUESTION, prompt=prompt, answers=(str(pass_key),),
        length=length, depth=drawn, max_new_tokens=max_new_tokens, metric="exact_match",
        meta={"num_tokens": num_tokens, "filler_chars": num_chars,
              "tokenizer": tokenizer_name(tokenizer), "index": index, "seed": seed})
