"""Asking a model about a long context, text in and text out, with kvpress's protocol.

    text = answer(params, cfg, tokenizer, context, "What is the pass key?", press=SnapKV(0.5))

kvpress's `KVPressTextGenerationPipeline` compresses the context only: the chat template is
rendered around the context followed by a separator, and split there into the context part
(everything up to the end of the context) and a suffix (the template's closing part, e.g.
`<|im_end|>\\n<|im_start|>assistant\\n`). Without a chat template the context part is BOS +
context and the suffix "\\n". Both are tokenized without special tokens; the context is
prefilled and compressed, then each question + suffix + answer prefix is appended at the
positions after the original context, and decoding is greedy until EOS. Several questions
about one context reuse its compressed cache. `encode_context_question` gives the token ids
the pipeline would feed; `answer_ids` the generated ids; `answer` the decoded text.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np

from lcm.checks import is_int
from lcm.config import ModelConfig
from lcm.eval.generation import (
    append_question,
    compress_context,
    default_generate_fn,
    generate_from_cache,
    question_generate,
)


def encode_context_question(tokenizer, context: str, questions, *, answer_prefix: str = "",
                            chat_template: bool = True) -> tuple[list[int], list[list[int]]]:
    """(context ids, [ids of each question + suffix + answer_prefix]) as kvpress's pipeline
    tokenizes them.

    tokenizer: `encode(text) -> list[int]` without special tokens (`lcm.io`'s `GGUFTokenizer`,
    `lcm.data`'s tokenizers); its `chat_template` and `apply_chat_template` are used when
    chat_template is True and it has a template, else the context is prefixed with its BOS id
    (when it has one) and the suffix is "\\n". questions: a str or a list of str.
    """
    questions = [questions] if isinstance(questions, str) else questions
    _check_texts(context, questions, answer_prefix)
    if chat_template not in (True, False):
        raise ValueError(f"chat_template={chat_template!r}; expected True (use the tokenizer's "
                         f"template when it has one) or False")
    for name in ("encode", "decode"):
        if not callable(getattr(tokenizer, name, None)):
            raise ValueError(f"tokenizer={tokenizer!r} has no {name}(); expected an lcm.io "
                             f"GGUFTokenizer or an lcm.data tokenizer")
    if chat_template and getattr(tokenizer, "chat_template", None) is not None:
        separator = "#" * (len(context) + 10)
        text = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}],
                                             add_generation_prompt=True)
        parts = text.split(separator)
        if len(parts) != 2:
            raise ValueError(f"the tokenizer's chat template writes the message {len(parts) - 1}"
                             f" times; expected once (pass chat_template=False)")
        head, suffix = parts
        context_ids = list(tokenizer.encode(head))
    else:
        bos = getattr(tokenizer, "bos_id", None)
        context_ids = ([] if bos is None else [int(bos)]) + list(tokenizer.encode(context))
        suffix = "\n"
    if not context_ids:
        raise ValueError("context has no tokens (an empty context and no BOS or chat template)")
    return context_ids, [list(tokenizer.encode(q + suffix + answer_prefix)) for q in questions]


def answer_ids(params, cfg: ModelConfig, tokenizer, context, question, *, press=None,
               max_new_tokens: int = 50, answer_prefix: str = "", chat_template: bool = True,
               stop_tokens=None, pad_multiple: int = 64) -> list[list[int]]:
    """The generated token ids of `answer` (without the final stop token), one list per
    answer in `answer`'s order; the arguments are `answer`'s."""
    pairs, one_context = _pairs(context, question)
    _check_options(max_new_tokens, press, pad_multiple)
    stop = _stop_tokens(tokenizer, stop_tokens)
    if one_context:
        context_ids, question_ids = encode_context_question(
            tokenizer, pairs[0][0], [q for _, q in pairs], answer_prefix=answer_prefix,
            chat_template=chat_template)
        rows = [(context_ids, q) for q in question_ids]
    else:
        rows = []
        for c, q in pairs:
            context_ids, (question_ids,) = encode_context_question(
                tokenizer, c, [q], answer_prefix=answer_prefix, chat_template=chat_template)
            rows.append((context_ids, question_ids))
    _check_length(cfg, rows, max_new_tokens)
    if press is None and cfg.positions.type != "rope":
        # Nothing is compressed: the one-shot prompt gives the same tokens (Self-Extend, ...).
        prompts = [c + q for c, q in rows]
        tokens, lengths = _pad(prompts, pad_multiple)
        out, count = default_generate_fn(cfg)(params, cfg, tokens, lengths=lengths,
                                              max_new_tokens=max_new_tokens, policy=None,
                                              stop_tokens=stop, temperature=0.0)
    elif one_context:
        out, count = _one_context(params, cfg, rows, press, max_new_tokens, stop, pad_multiple)
    else:
        contexts, context_lengths = _pad([c for c, _ in rows], pad_multiple)
        questions, question_lengths = _pad([q for _, q in rows], 16, minimum=0)
        out, count = question_generate(params, cfg, contexts, questions,
                                       context_lengths=context_lengths,
                                       question_lengths=question_lengths,
                                       max_new_tokens=max_new_tokens, policy=press,
                                       stop_tokens=stop)
    out, count = np.asarray(out), np.asarray(count)
    result = []
    for i in range(len(rows)):
        ids = [int(t) for t in out[i, :int(count[i])]]
        if ids and ids[-1] in stop:
            ids = ids[:-1]
        result.append(ids)
    return result


def answer(params, cfg: ModelConfig, tokenizer, context, question, *, press=None,
           max_new_tokens: int = 50, answer_prefix: str = "", chat_template: bool = True,
           stop_tokens=None, pad_multiple: int = 64):
    """Answers questions about a long context, compressing the context only (kvpress's
    protocol, module docstring): text in, text out.

    params, cfg: a loaded model (`lcm.io.load_smollm2()`, `lcm.io.load_pretrained`);
    tokenizer: its tokenizer (`encode`, `decode`, `eos_id`, `bos_id`, and `chat_template` /
    `apply_chat_template` when it has a template). context, question:

    - a str and a str: the answer, a str;
    - a str and a list of str: one answer per question, the context prefilled and compressed
      once and its cache reused for every question (as kvpress does);
    - a list of str and a list of str of the same length: one answer per (context, question)
      pair, run as one batch of right-padded rows;
    - a list of str and a str: the question asked of every context.

    press: a prefill press from `lcm.cache` (`SnapKV(compression_ratio=0.5)`, ...) or None for
    the full cache. max_new_tokens: the most tokens generated per answer. answer_prefix: text
    appended after the question and the template's closing part (the start of the answer).
    chat_template: use the tokenizer's chat template when it has one (False: BOS + context,
    question + "\\n"). stop_tokens: ids that end an answer (default the tokenizer's EOS).
    pad_multiple: contexts are right-padded to a multiple of it (fewer compilations).
    Decoding is greedy; the answer is decoded without special tokens.
    """
    ids = answer_ids(params, cfg, tokenizer, context, question, press=press,
                     max_new_tokens=max_new_tokens, answer_prefix=answer_prefix,
                     chat_template=chat_template, stop_tokens=stop_tokens,
                     pad_multiple=pad_multiple)
    skip = "skip_special_tokens" in inspect.signature(tokenizer.decode).parameters
    texts = [tokenizer.decode(i, skip_special_tokens=True) if skip else tokenizer.decode(i)
             for i in ids]
    return texts[0] if isinstance(context, str) and isinstance(question, str) else texts


def _one_context(params, cfg, rows, press, max_new_tokens, stop, pad_multiple):
    """One context, several questions: one compression, then each question from its cache."""
    (context_ids, _), questions = rows[0], [q for _, q in rows]
    width = _round_up(max(max(len(q) for q in questions), 1), 16)
    tokens, lengths = _pad([context_ids], pad_multiple)
    logits, cache = compress_context(params, cfg, tokens, context_lengths=lengths, policy=press,
                                     room=width + max_new_tokens - 1)
    outs, counts = [], []
    for q in questions:
        # A PolicyCache takes the real tokens only; a KVCache one padded width per question.
        size = max(len(q), 1) if _is_policy_cache(cache) else width
        ids = np.zeros((1, size), np.int32)
        ids[0, :len(q)] = q
        first, extended = append_question(params, cfg, logits, cache, ids,
                                          np.asarray([len(q)], np.int32))
        out, count = generate_from_cache(params, cfg, first, extended,
                                         max_new_tokens=max_new_tokens, stop_tokens=stop)
        outs.append(out)
        counts.append(count)
    return jnp.concatenate(outs), jnp.concatenate(counts)


def _is_policy_cache(cache) -> bool:
    from lcm.cache import PolicyCache
    return isinstance(cache, PolicyCache)


def _pairs(context, question):
    """([(context, question)], whether one context is shared by every question)."""
    if isinstance(context, str):
        if isinstance(question, str):
            return [(context, question)], True
        if isinstance(question, (list, tuple)) and question:
            return [(context, q) for q in question], True
        raise ValueError(f"question={question!r}; expected a str or a non-empty list of str")
    if not isinstance(context, (list, tuple)) or not context:
        raise ValueError(f"context is a {type(context).__name__}; expected a str or a non-empty "
                         f"list of str")
    if isinstance(question, str):
        return [(c, question) for c in context], False
    if not isinstance(question, (list, tuple)) or len(question) != len(context):
        got = (f"{len(question)} questions" if isinstance(question, (list, tuple))
               else f"a {type(question).__name__}")
        raise ValueError(f"question: {got} for {len(context)} contexts; expected a str or a "
                         f"list of {len(context)} str (one per context)")
    return list(zip(context, question)), False


def _check_texts(context, questions, answer_prefix):
    if not isinstance(context, str):
        raise ValueError(f"context is a {type(context).__name__}; expected a str")
    if not isinstance(questions, (list, tuple)) or not all(isinstance(q, str) for q in questions):
        raise ValueError(f"questions={questions!r}; expected a str or a list of str")
    if not isinstance(answer_prefix, str):
        raise ValueError(f"answer_prefix={answer_prefix!r}; expected a str")


def _check_options(max_new_tokens, press, pad_multiple):
    from lcm.cache import is_prefill_press
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1")
    if not is_int(pad_multiple) or pad_multiple < 1:
        raise ValueError(f"pad_multiple={pad_multiple!r}; expected an int >= 1")
    if press is not None and not is_prefill_press(press):
        raise ValueError(f"press={press!r}; expected None or a prefill press from lcm.cache "
                         f"(SnapKV(compression_ratio=0.5), StreamingLLM, Knorm, ...)")


def _stop_tokens(tokenizer, stop_tokens) -> tuple[int, ...]:
    if stop_tokens is None:
        eos = getattr(tokenizer, "eos_id", None)
        return () if eos is None else (int(eos),)
    if not isinstance(stop_tokens, (list, tuple)) or not all(is_int(t) for t in stop_tokens):
        raise ValueError(f"stop_tokens={stop_tokens!r}; expected None (the tokenizer's EOS) or "
                         f"a list of token ids")
    return tuple(int(t) for t in stop_tokens)


def _check_length(cfg, rows, max_new_tokens):
    from lcm.eval.loop import max_context_length
    limit = max_context_length(cfg)
    for c, q in rows:
        if limit is not None and len(c) + len(q) + max_new_tokens > limit:
            raise ValueError(f"{len(c)} context + {len(q)} question tokens + max_new_tokens="
                             f"{max_new_tokens} exceed the model's usable length {limit}; "
                             f"shorten the context or extend the model's context (RopeConfig "
                             f"scaling, PositionConfig self_extend)")


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _pad(rows, multiple, minimum=1):
    """Right-padded int32 [B, width] (width a multiple of `multiple`, >= 1) and lengths [B]."""
    width = _round_up(max(max(len(r) for r in rows), 1), multiple)
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    lengths = np.asarray([len(r) for r in rows], np.int32)
    if lengths.min() < minimum:
        raise ValueError("a context has no tokens")
    return out, lengths
