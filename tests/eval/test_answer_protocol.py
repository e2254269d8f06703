"""kvpress's protocol: the context compressed, the question appended after compression.

Equivalences on a tiny model (the full cache gives the one-shot prompt's tokens; one prefill for
several policies gives each policy's own run; the loop's split), then `lcm.eval.answer` on
SmolLM2: equal to the steps done by hand, and to kvpress's pipeline (ids fed and ids generated,
the fixture of tests/fixtures/make_kvpress_answer_fixtures.py).
"""

import dataclasses
import functools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import CFG, PARAMS, TOK, _records

from lcm.cache import (
    KIVI,
    Decoding,
    Knorm,
    SnapKV,
    StreamingLLM,
    decode_step,
    extend,
    generate,
    prefill,
)
from lcm.config import PositionConfig
from lcm.data import Record, make_niah, make_passkey
from lcm.eval import (
    EvalOptions,
    answer,
    answer_ids,
    encode_context_question,
    evaluate,
    question_generate,
    shared_prefill_generate,
)
from lcm.eval.generation import generate_from_cache
from lcm.eval.loop import question_tokens, split_point
from lcm.eval.results import read_results

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kvpress_answer" / "cases.json"
SNAP = SnapKV(compression_ratio=0.5, window_size=8)


def _ragged(seed=0, context_lengths=(40, 23, 31), question_lengths=(5, 9, 0)):
    rng = np.random.default_rng(seed)
    cl, ql = np.array(context_lengths), np.array(question_lengths)
    ctx = np.zeros((len(cl), 48), np.int32)
    qs = np.zeros((len(cl), 16), np.int32)
    full = np.zeros((len(cl), 64), np.int32)
    for i in range(len(cl)):
        ctx[i, :cl[i]] = rng.integers(0, 40, cl[i])
        qs[i, :ql[i]] = rng.integers(0, 40, ql[i])
        full[i, :cl[i] + ql[i]] = np.concatenate([ctx[i, :cl[i]], qs[i, :ql[i]]])
    return ctx, cl, qs, ql, full


@pytest.mark.slow
def test_full_cache_equals_the_one_shot_prompt_and_policies_share_a_prefill():
    ctx, cl, qs, ql, full = _ragged()
    want = generate(PARAMS, CFG, full, lengths=cl + ql, max_new_tokens=7)
    got = question_generate(PARAMS, CFG, ctx, qs, context_lengths=cl, question_lengths=ql,
                            max_new_tokens=7)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    shared = shared_prefill_generate(PARAMS, CFG, ctx, lengths=cl, max_new_tokens=7,
                                     policies=(None, SNAP), questions=qs, question_lengths=ql)
    np.testing.assert_array_equal(shared[0][0], want[0])
    alone = question_generate(PARAMS, CFG, ctx, qs, context_lengths=cl, question_lengths=ql,
                              max_new_tokens=7, policy=SNAP)
    np.testing.assert_array_equal(shared[1][0], alone[0])
    np.testing.assert_array_equal(shared[1][1], alone[1])
    # Compressing the context changes the answer somewhere, so the equalities are not vacuous;
    # and the question appended after compression differs from compressing it too.
    assert len({np.asarray(t).tobytes() for t, _ in shared}) > 1
    aware = generate(PARAMS, CFG, full, lengths=cl + ql, max_new_tokens=7, policy=SNAP)
    assert not np.array_equal(aware[0], shared[1][0])


def test_kivi_appends_its_question_step_by_step_and_ragged_rows_alone():
    ctx, cl, qs, ql, _ = _ragged(1, (40, 23), (5, 9))
    kivi = KIVI(bits=4, group_size=8, residual_length=8)
    tokens, count = question_generate(PARAMS, CFG, ctx, qs, context_lengths=cl,
                                      question_lengths=ql, max_new_tokens=5, policy=kivi)
    for i in range(2):  # by hand: prefill the context, feed the question, decode
        logits, cache = prefill(PARAMS, ctx[i:i + 1], CFG, policy=kivi, lengths=cl[i:i + 1],
                                max_new_tokens=16 + 4)
        for t in qs[i, :ql[i]]:
            logits, cache = decode_step(PARAMS, cache, jnp.asarray([t]), CFG)
        want, _ = generate_from_cache(PARAMS, CFG, logits, cache, max_new_tokens=5)
        np.testing.assert_array_equal(tokens[i], want[0])


def test_protocol_errors():
    ctx, cl, qs, ql, _ = _ragged()
    with pytest.raises(ValueError, match="questions: shape"):
        question_generate(PARAMS, CFG, ctx, qs[:2], context_lengths=cl, max_new_tokens=2)
    with pytest.raises(ValueError, match="question_lengths="):
        question_generate(PARAMS, CFG, ctx, qs, context_lengths=cl, question_lengths=ql + 20,
                          max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        question_generate(PARAMS, CFG, ctx, qs + 100, context_lengths=cl, max_new_tokens=2)
    with pytest.raises(ValueError, match="prefill press"):
        question_generate(PARAMS, CFG, ctx, qs, context_lengths=cl, max_new_tokens=2,
                          policy=Decoding(Knorm(), compression_interval=4, target_size=8))
    extended = dataclasses.replace(CFG, positions=PositionConfig(type="self_extend", window=8,
                                                                  group_size=2))
    with pytest.raises(ValueError, match="positions.type='self_extend'"):
        question_generate(PARAMS, extended, ctx, qs, context_lengths=cl, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        question_generate(PARAMS, CFG, ctx, qs, context_lengths=cl, max_new_tokens=0)
    with pytest.raises(ValueError, match="compress_question='yes'"):
        EvalOptions(compress_question="yes")


def test_the_loop_splits_at_the_context_and_appends_the_question(tmp_path):
    records = _records(lengths=(56,), tasks=("niah_single_1",))
    options = EvalOptions(batch_size=3, pad_multiple=32, progress=False, heatmaps=False)
    evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "a"), options=options, policy=SNAP)
    rows = {r["id"]: r for r in read_results(str(tmp_path / "a" / "results.jsonl"))}
    # By hand: each prompt's tokens split where the context ends (the shapes the loop pads to).
    contexts = np.full((3, 64), TOK.pad_id, np.int32)
    questions = np.zeros((3, 16), np.int32)
    cl, ql = np.zeros(3, np.int32), np.zeros(3, np.int32)
    for i, record in enumerate(records):
        ids = TOK.encode(record.prompt)
        head = TOK.encode(record.prompt[:split_point(record)])
        q = question_tokens(record, TOK)
        assert ids[:len(ids) - q] == head and q >= 1
        contexts[i, :len(head)], questions[i, :q] = head, ids[len(head):]
        cl[i], ql[i] = len(head), q
    assert len(set(ql.tolist())) > 1  # the context found in the prompt, or the question
    tokens, count = question_generate(PARAMS, CFG, contexts, questions, context_lengths=cl,
                                      question_lengths=ql, max_new_tokens=6, policy=SNAP,
                                      stop_tokens=(TOK.eos_id,))
    for i, record in enumerate(records):
        gen = [int(t) for t in np.asarray(tokens)[i, :int(count[i])] if t != TOK.eos_id]
        assert rows[record.id]["prediction"] == TOK.decode(gen)
    # The protocol is in the fingerprint: the other one refuses to resume these results.
    with pytest.raises(ValueError, match="different setup"):
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "a"), policy=SNAP,
                 options=dataclasses.replace(options, compress_question=True))
    # A custom generate_fn compresses the whole prompt: refused under the default protocol.
    with pytest.raises(ValueError, match="compress_question=True"):
        evaluate(PARAMS, CFG, records, TOK, str(tmp_path / "b"), options=options, policy=SNAP,
                 generate_fn=generate)
    lost = Record(id="x", task="passkey", context="absent", question="nowhere", prompt="abc",
                  answers=("1",), length=8, max_new_tokens=2, metric="exact_match")
    with pytest.raises(ValueError, match="neither its context nor its question"):
        split_point(lost)


# ----------------------------------------------------------------------------- SmolLM2

@functools.cache
def smollm2():
    from lcm.io import load_smollm2
    return load_smollm2()


def test_generators_split_into_context_and_question_tokens_exactly():
    _, _, tok = smollm2()
    chat = "<|im_start|>user\n{task_template}<|im_end|>\n<|im_start|>assistant\n"
    records = [make_passkey(0, seed=1, length=400, tokenizer=tok),
               make_niah(0, seed=1, length=400, tokenizer=tok, depth=0.5),
               make_niah(1, seed=1, length=400, tokenizer=tok, depth=0.2, template=chat)]
    for record in records:
        ids = tok.encode(record.prompt)
        split = split_point(record)
        assert record.prompt[:split].endswith(record.context)
        head, rest = tok.encode(record.prompt[:split]), tok.encode(record.prompt[split:])
        assert head + rest == ids  # separate tokenization gives the prompt's tokens
        assert question_tokens(record, tok) == len(rest) > 0


@pytest.mark.slow
def test_answer_on_smollm2_equals_the_steps_by_hand():
    cfg, params, tok = smollm2()
    context = ("Anna keeps three cats. The black one is called Pepper, the white one Snow and "
               "the grey one Ash.\n") * 8
    questions = ["What is the white cat called?", "How many cats does Anna keep?"]
    press = SnapKV(compression_ratio=0.5)
    got = answer_ids(params, cfg, tok, context, questions, press=press, max_new_tokens=8)
    context_ids, question_ids = encode_context_question(tok, context, questions)
    rendered = tok.apply_chat_template([{"role": "user", "content": context + questions[0]}])
    assert tok.encode(rendered) == context_ids + question_ids[0]  # the split is exact here
    # By hand, unpadded: prefill + compress the context, extend by the question, decode.
    q = question_ids[0]
    logits, cache = prefill(params, jnp.asarray([context_ids]), cfg, policy=press,
                            max_new_tokens=len(q) + 7)
    logits, cache = extend(params, cache, jnp.asarray([q]), cfg, all_logits=False)
    tokens, count = generate_from_cache(params, cfg, logits, cache, max_new_tokens=8,
                                        stop_tokens=(tok.eos_id,))
    want = [int(t) for t in np.asarray(tokens)[0, :int(count[0])]]
    assert got[0] == [t for t in want if t != tok.eos_id]
    # Text, one cache for two questions, batching and broadcasting: the same answers however
    # they are asked.
    texts = answer(params, cfg, tok, context, questions, press=press, max_new_tokens=8)
    assert texts == [tok.decode(i, skip_special_tokens=True) for i in got]
    assert answer(params, cfg, tok, context, questions[1], press=press,
                  max_new_tokens=8) == texts[1]
    assert answer(params, cfg, tok, [context, context], questions, press=press,
                  max_new_tokens=8) == texts
    with pytest.raises(ValueError, match="2 questions for 3 contexts"):
        answer(params, cfg, tok, [context] * 3, questions)
    with pytest.raises(ValueError, match="press="):
        answer(params, cfg, tok, context, questions[0], press="snapkv")
    with pytest.raises(ValueError, match="context is a int"):
        answer(params, cfg, tok, 3, questions[0])
    with pytest.raises(ValueError, match="exceed the model's usable length"):
        answer(params, cfg, tok, "word " * 9000, questions[0])


@pytest.mark.slow
def test_answer_matches_kvpress_pipeline_on_smollm2():
    cfg, params, tok = smollm2()
    data = json.loads(FIXTURE.read_text())
    presses = {None: None, "snapkv": SnapKV, "streaming_llm": StreamingLLM, "knorm": Knorm}
    assert len(data["cases"]) >= 8
    for case in data["cases"]:
        name = case["name"]
        press = presses[case["press"]]
        press = None if press is None else press(**case["press_settings"])
        context = data["contexts"][case["context"]]
        context_ids, question_ids = encode_context_question(
            tok, context, case["questions"], answer_prefix=case["answer_prefix"],
            chat_template=case["chat_template"])
        assert context_ids == case["context_ids"], name
        assert question_ids == case["question_ids"], name
        got = answer_ids(params, cfg, tok, context, case["questions"], press=press,
                         max_new_tokens=case["max_new_tokens"],
                         answer_prefix=case["answer_prefix"],
                         chat_template=case["chat_template"], pad_multiple=640)
        want = [[t for t in ids if t != data["eos_token_id"]] for ids in case["answer_ids"]]
        assert got == want, name
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in got]
        assert texts == case["answers"], name
