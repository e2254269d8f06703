"""RULER's non-NIAH synthetic tasks: variable tracking (vt), common and frequent word extraction
(cwe, fwe), and QA over SQuAD / HotpotQA documents (qa_1, qa_2), fitted to an exact token budget.

Ports of `scripts/data/synthetic/{variable_tracking,common_words_extraction,
freq_words_extraction,qa}.py` with `synthetic.yaml`'s settings and `constants.py`'s templates and
generation budgets (vt 30, cwe 120, fwe 50, qa 32). Departures, all forced by a record being a pure
function of (task, seed, index, length, tokenizer): draws come from the record's own generator;
random insertion points are drawn as fractions of the haystack so a larger haystack keeps them;
vt's in-context example is made per record (RULER makes one per run, then re-letters it per
sample); cwe falls back to generated pseudo-words where RULER reads its `english_words.json`
(needed only above ~8,000 distinct words); qa reads the user's local SQuAD v2 dev / HotpotQA
distractor-dev JSON (RULER downloads them).
"""

from __future__ import annotations

import functools
import json
import os
import string

import numpy as np
from scipy.special import zeta

from lcm.data.fit import check_budget, fit_largest, task_rng
from lcm.data.haystack import NOISE, word_lists
from lcm.data.records import Record, record_id
from lcm.data.tokenizers import tokenizer_name

TEMPLATES = {
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text."
           "\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in "
           "the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
           "variables are assigned the value {query}, they are: ", 30),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the "
            "10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:", 120),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the "
            "three most frequently appeared coded words. {context}\nQuestion: Do not provide any "
            "explanation. Please ignore the dots '....'. What are the three most frequently "
            "appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words "
            "are:", 50),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do not "
           "output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer "
           "the question based on the given documents. Only give me the answer and do not output "
           "any other words.\n\nQuestion: {query}", " Answer:", 32),
}
DOCUMENT_PROMPT = "Document {i}:\n{document}"


def _check(task, length, max_new_tokens, reserve_tokens, template):
    budget = check_budget(task, length, max_new_tokens, reserve_tokens)
    if "{task_template}" not in template:
        raise ValueError(f"template={template!r}; expected a format string with {{task_template}}")
    return budget


def _record(task, index, seed, length, tokenizer, prompt, context, question, answers,
            max_new_tokens, metric, num_tokens, answer_prefix, **meta):
    return Record(id=record_id(task, length, index, seed), task=task, context=context,
                  question=question, prompt=prompt, answers=tuple(answers), length=length,
                  max_new_tokens=max_new_tokens, metric=metric,
                  meta={"num_tokens": num_tokens, "answer_prefix": answer_prefix,
                        "tokenizer": tokenizer_name(tokenizer), "index": index, "seed": seed,
                        **meta})


# ----------------------------------------------------------------------------- vt

def _letters(rng, k):
    return "".join(rng.choice(list(string.ascii_uppercase), k))


def _vt_text(rng, num_noises, num_chains, num_hops, icl):
    """(task prompt with answer prefix, the answer variables) for a noise haystack of
    num_noises lines; rng draws must not depend on num_noises (so fitting keeps them)."""
    k = 3 if icl else 5
    hops = min(10, num_hops) if icl else num_hops
    names: list[str] = []
    while len(set(names)) < num_chains * (hops + 1):
        names.append(_letters(rng, k))
    names = list(dict.fromkeys(names))
    chains, variables = [], []
    for c in range(num_chains):
        v = names[c * (hops + 1):(c + 1) * (hops + 1)]
        variables.append(v)
        value = "12345" if icl else str(int(rng.integers(10000, 99999)))
        chains.append([f"VAR {v[0]} = {value}"] + [f"VAR {v[j + 1]} = VAR {v[j]} "
                                                   for j in range(hops)])
    fractions = [np.sort(rng.random(len(chain))) for chain in chains]

    def build(n):
        lines = [NOISE] * n
        for chain, u in zip(chains, fractions):
            # RULER: sorted(random.sample(range(len(lines)), len(chain))), line j at position + j.
            positions = [int(f * len(lines)) for f in u]
            for j, (line, position) in enumerate(zip(chain, positions)):
                lines.insert(position + j, line)
        context = "\n".join(lines).replace(". \n", ".\n")
        query = chains[0][0].split("=")[-1].strip()
        body, prefix, _ = TEMPLATES["vt"]
        return (body.format(context=context, query=query),
                prefix.format(num_v=hops + 1, query=query), context, query)

    return build, variables[0]


def make_vt(index: int, *, seed: int, length: int, tokenizer, num_chains: int = 1,
            num_hops: int = 4, max_new_tokens: int = TEMPLATES["vt"][2], reserve_tokens: int = 0,
            template: str = "{task_template}", icl_length: int = 500) -> Record:
    """RULER `vt`: find every variable assigned a value through a chain of num_hops assignments,
    with one in-context example (3-letter names, value 12345, fitted to icl_length tokens)."""
    task = "vt"
    budget = _check(task, length, max_new_tokens, reserve_tokens, template)
    rng = task_rng(task, seed, index)
    icl_build, icl_answer = _vt_text(rng, 0, num_chains, num_hops, icl=True)
    icl_n, _ = fit_largest(lambda n: len(tokenizer.encode("".join(icl_build(n)[:2]))),
                           icl_length, lo=1, what=f"vt example at icl_length={icl_length}")
    body, prefix, _, _ = icl_build(icl_n)
    icl = body + prefix + " " + " ".join(icl_answer) + "\n"
    # RULER re-letters the example's answer names and value for each sample.
    for name in icl_answer:
        icl = icl.replace(name, _letters(rng, len(name)))
    icl = icl.replace("12345", str(int(rng.integers(10000, 99999))))
    build, answer = _vt_text(rng, 0, num_chains, num_hops, icl=False)

    def prompt(n):
        body, prefix, _, _ = build(n)
        return template.format(task_template=icl + "\n" + body) + prefix

    n, num_tokens = fit_largest(lambda n: len(tokenizer.encode(prompt(n))), budget, lo=1,
                                what=f"vt at length={length}")
    body, prefix, context, query = build(n)
    return _record(task, index, seed, length, tokenizer, prompt(n), context,
                   body.split("\n")[-1], answer, max_new_tokens, "string_match_all", num_tokens,
                   prefix, num_haystack=n, num_hops=num_hops, num_chains=num_chains)


# ----------------------------------------------------------------------------- cwe

@functools.cache
def _cwe_words() -> tuple[str, ...]:
    lists = word_lists()
    return tuple(sorted(set(lists["nouns"]) | set(lists["adjectives"]) | set(lists["verbs"])))


def _pseudo_words(rng, n):
    """n distinct lower-case pseudo-words (when more words are needed than the lists hold)."""
    out: dict[str, None] = {}
    while len(out) < n:
        out[_letters(rng, int(rng.integers(4, 9))).lower()] = None
    return list(out)


def _cwe_example(rng, num_words, common_repeats, uncommon_repeats, num_common):
    words = _cwe_words()
    if num_words <= len(words):
        chosen = [words[i] for i in rng.choice(len(words), num_words, replace=False)]
    else:
        chosen = _pseudo_words(rng, num_words)
    common, uncommon = chosen[:num_common], chosen[num_common:]
    listing = common * common_repeats + uncommon * uncommon_repeats
    listing = [listing[i] for i in rng.permutation(len(listing))]
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing)), common


def make_cwe(index: int, *, seed: int, length: int, tokenizer, freq_cw: int = 30,
             freq_ucw: int = 3, num_cw: int = 10, num_fewshot: int = 1,
             max_new_tokens: int = TEMPLATES["cwe"][2], reserve_tokens: int = 0,
             template: str = "{task_template}") -> Record:
    """RULER `cwe`: name the num_cw words repeated freq_cw times among words repeated freq_ucw
    times (6 and 1 below length 4096, with smaller few-shot examples, as RULER does)."""
    task = "cwe"
    budget = _check(task, length, max_new_tokens, reserve_tokens, template)
    body, prefix, _ = TEMPLATES["cwe"]
    short = length < 4096
    seeds = task_rng(task, seed, index).integers(2**63, size=num_fewshot + 1)
    shots = []
    for s in seeds[:num_fewshot]:
        context, answer = _cwe_example(np.random.default_rng(s), 20 if short else 40,
                                       3 if short else 10, 1 if short else 3, num_cw)
        shots.append(template.format(task_template=body.format(context=context)) + prefix + " "
                     + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer)))
    shots_text = "\n".join(shots)

    def build(n):
        context, answer = _cwe_example(np.random.default_rng(seeds[-1]), n, 6 if short else freq_cw,
                                       1 if short else freq_ucw, num_cw)
        return (shots_text + "\n" + template.format(task_template=body.format(context=context))
                + prefix), context, answer

    n, num_tokens = fit_largest(lambda n: len(tokenizer.encode(build(n)[0])), budget, lo=num_cw,
                                what=f"cwe at length={length}")
    prompt, context, answer = build(n)
    return _record(task, index, seed, length, tokenizer, prompt, context,
                   body.split("\n")[-1], answer, max_new_tokens, "string_match_all", num_tokens,
                   prefix, num_words=n)


# ----------------------------------------------------------------------------- fwe

def make_fwe(index: int, *, seed: int, length: int, tokenizer, alpha: float = 2.0,
             coded_wordlen: int = 6, vocab_size: int | None = None,
             max_new_tokens: int = TEMPLATES["fwe"][2], reserve_tokens: int = 0,
             template: str = "{task_template}") -> Record:
    """RULER `fwe`: the three most frequent coded words of a Zipf(alpha) text; the most frequent
    word is replaced by '...' (noise). vocab_size defaults to the prompt budget // 50."""
    task = "fwe"
    budget = _check(task, length, max_new_tokens, reserve_tokens, template)
    if alpha <= 1:
        raise ValueError(f"alpha={alpha}; expected > 1 (a Zipf distribution)")
    vocab_size = budget // 50 if vocab_size is None else vocab_size
    if vocab_size < 4:
        raise ValueError(f"fwe: vocab_size={vocab_size} (length={length}); expected >= 4")
    rng = task_rng(task, seed, index)
    vocab: dict[str, None] = {}
    while len(vocab) < vocab_size:
        vocab["".join(rng.choice(list(string.ascii_lowercase), coded_wordlen))] = None
    words = sorted(vocab)
    words = [words[i] for i in rng.permutation(len(words))]
    words[0] = "..."
    shuffle_seed = int(rng.integers(2**63))
    k = np.arange(1, len(words) + 1)
    body, prefix, _ = TEMPLATES["fwe"]

    def build(n):
        counts = (n * (k ** -alpha) / zeta(alpha)).astype(int)
        text = [w for w, c in zip(words, counts) for _ in range(c)]
        text = [text[i] for i in np.random.default_rng(shuffle_seed).permutation(len(text))]
        context = " ".join(text)
        return template.format(task_template=body.format(context=context)) + prefix, context

    n, num_tokens = fit_largest(lambda n: len(tokenizer.encode(build(n)[0])), budget,
                                what=f"fwe at length={length}")
    prompt, context = build(n)
    return _record(task, index, seed, length, tokenizer, prompt, context,
                   body.split("\n")[-1], words[1:4], max_new_tokens, "string_match_all",
                   num_tokens, prefix, num_words=n, vocab_size=vocab_size)


# ----------------------------------------------------------------------------- qa

def _load_json(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"QA file {path!r} does not exist; RULER's qa_1 needs SQuAD v2 dev "
                         f"(dev-v2.0.json), qa_2 HotpotQA distractor dev "
                         f"(hotpot_dev_distractor_v1.json), on local disk")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from e


@functools.cache
def load_squad(path) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """(questions, documents) of a SQuAD v2 file as RULER reads it (answerable questions; each
    with its paragraph and the article's other paragraphs)."""
    data = _load_json(path)
    try:
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        where = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            more = [where[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for qa in p["qas"]:
                    if not qa.get("is_impossible", False):
                        qas.append({"query": qa["question"],
                                    "outputs": [a["text"] for a in qa["answers"]],
                                    "context": [where[p["context"]]],
                                    "more_context": [i for i in more if i != where[p["context"]]]})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)}: not in SQuAD format (missing {e}); expected "
                         f"{{'data': [{{'paragraphs': [{{'context', 'qas'}}]}}]}}") from e
    return tuple(qas), tuple(docs)


@functools.cache
def load_hotpotqa(path) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """(questions, documents) of a HotpotQA distractor file as RULER reads it."""
    data = _load_json(path)
    try:
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        where = {c: i for i, c in enumerate(docs)}
        qas = [{"query": d["question"], "outputs": [d["answer"]],
                "context": [where[f"{t}\n{''.join(p)}"] for t, p in d["context"]],
                "more_context": []} for d in data]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{os.fspath(path)}: not in HotpotQA format ({e}); expected a list of "
                         f"{{'question', 'answer', 'context': [[title, sentences]]}}") from e
    return tuple(qas), tuple(docs)


def make_qa(index: int, *, seed: int, length: int, tokenizer, path, dataset: str = "squad",
            max_new_tokens: int = TEMPLATES["qa"][2], reserve_tokens: int = 0,
            template: str = "{task_template}") -> Record:
    """RULER qa_1 (dataset='squad') / qa_2 ('hotpotqa'): question `index` of the file, its
    gold documents among distractors ("Document i:" blocks), as many as fit."""
    loaders = {"squad": ("qa_1", load_squad), "hotpotqa": ("qa_2", load_hotpotqa)}
    if dataset not in loaders:
        raise ValueError(f"dataset={dataset!r}; expected one of {sorted(loaders)}")
    task, load = loaders[dataset]
    budget = _check(task, length, max_new_tokens, reserve_tokens, template)
    qas, docs = load(os.fspath(path))
    if not 0 <= index < len(qas):
        raise ValueError(f"index={index}; {os.fspath(path)} has {len(qas)} usable questions")
    qa = qas[index]
    rng = task_rng(task, seed, index)
    gold, more = list(qa["context"]), list(qa["more_context"])
    taken = set(gold) | set(more)
    others = [i for i in range(len(docs)) if i not in taken]
    # A prefix of this order is RULER's draw for any number of documents.
    order = gold + [more[i] for i in rng.permutation(len(more))] + [
        others[i] for i in rng.permutation(len(others))]
    shuffle_seed = int(rng.integers(2**63))
    body, prefix, _ = TEMPLATES["qa"]

    def build(n):
        # RULER repeats the whole collection when more documents are asked for than it holds.
        chosen = order[:n] if n < len(docs) else (list(range(len(docs))) * (n // len(docs) + 1))[:n]
        chosen = [docs[i] for i in chosen]
        chosen = [chosen[i] for i in np.random.default_rng(shuffle_seed).permutation(len(chosen))]
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d)
                              for i, d in enumerate(chosen))
        return (template.format(task_template=body.format(context=context, query=qa["query"]))
                + prefix), context

    n, num_tokens = fit_largest(lambda n: len(tokenizer.encode(build(n)[0])), budget,
                                lo=len(gold), what=f"{task} at length={length}")
    prompt, context = build(n)
    return _record(task, index, seed, length, tokenizer, prompt, context, qa["query"],
                   qa["outputs"], max_new_tokens, "string_match_part", num_tokens, prefix,
                   num_docs=n, source=os.path.basename(os.fspath(path)))
