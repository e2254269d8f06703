"""ROUGE-L F as LongBench computes it: the PyPI `rouge` package (1.0.1), summary level, exclusive.

LongBench's `rouge_score` calls `Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]` and
returns 0 on any exception. Written here from that package's definition, not `rouge-score`'s
(the two differ on multi-sentence text):

- sentences are the non-empty pieces of `text.split(".")`, each with whitespace runs collapsed
  (a whitespace-only piece becomes the empty word);
- m, n are the numbers of *distinct* words of the reference and the hypothesis;
- the overlap is the number of distinct words in the union, over every (reference sentence,
  hypothesis sentence) pair, of the longest common subsequence that the package's traceback picks
  (diagonal on a match, else up when the cell above is strictly larger, else left);
- F = 2 * (P * R) / (P + R + 1e-8) with P = overlap / n, R = overlap / m, in that order.

Two failure modes score 0 as in LongBench: an empty hypothesis or reference (no sentence left),
and a traceback longer than Python's recursion limit allows the package's recursive `_recon`
(about 990 words of one sentence pair: LongBench then scores 0, silently). The depth limit is
measured by running LongBench's own `eval.py` (see tests/fixtures/metrics/).
"""

from __future__ import annotations

# Deepest `_recon` call chain that LongBench's eval.py completes under CPython's default recursion
# limit (1000 frames), for `rouge_score` called by eval.py's `scorer`; `rouge_zh_score` calls
# `rouge_score` from one frame deeper, so it has one call fewer. Measured, see the module doc.
RECON_DEPTH_LIMIT = 991


def _sentences(text: str) -> list[str]:
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _words(sentences: list[str]) -> list[str]:
    return [w for s in sentences for w in s.split(" ")]


def _lcs_words(x: list[str], y: list[str]) -> tuple[list[str], int]:
    """The LCS of x and y that the package's traceback picks, and that traceback's call depth."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, xi = table[i], table[i - 1], x[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    words, i, j, depth = [], n, m, 1
    while i > 0 and j > 0:
        depth += 1
        if x[i - 1] == y[j - 1]:
            words.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words, depth


def rouge_l_f(hypothesis: str, reference: str, *, depth_limit: int = RECON_DEPTH_LIMIT) -> float:
    """ROUGE-L F of the `rouge` package (see module doc); 0.0 where LongBench's call fails."""
    hyp, ref = _sentences(hypothesis), _sentences(reference)
    if not hyp or not ref:
        return 0.0  # the package raises "Hypothesis is empty." / "Reference is empty."
    m = len(set(_words(ref)))
    n = len(set(_words(hyp)))
    union: set[str] = set()
    for ref_sentence in ref:
        ref_words = ref_sentence.split(" ")
        for hyp_sentence in hyp:
            words, depth = _lcs_words(ref_words, hyp_sentence.split(" "))
            if depth > depth_limit:
                return 0.0  # RecursionError in the package, caught by LongBench
            union.update(words)
    llcs = len(union)
    r_lcs = llcs / m
    p_lcs = llcs / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))
