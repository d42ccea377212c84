"""Answer and retrieval metrics for open-domain QA, as the RAG paper reports them.

- `exact_match` / `f1`: SQuAD v1.1 (Rajpurkar et al., 2016) answer normalisation and token F1,
  maximised over the gold answers; `qa_metrics` aggregates them in percent.
- `has_answer`: DPR's (Karpukhin et al., 2020) test for "this passage contains an answer",
  which defines top-K retrieval accuracy; `retrieval_recall` aggregates it.

All functions are pure: strings and lists in, numbers out.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

import regex

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _gold_list(answers: str | Sequence[str]) -> list[str]:
    """Gold answers as a non-empty list; a bare string is one answer."""
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("no gold answers given: the score of a prediction against nothing is undefined")
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"gold answers must be strings, got {type(a).__name__}: {a!r}")
    return answers


# --- SQuAD v1.1 ------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop ASCII punctuation, drop a/an/the, squeeze spaces.

    The order (lower -> punctuation -> articles -> whitespace) is the official script's and
    matters: "The-End" loses its hyphen to become "theend", which keeps its "the".
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _em_one(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1_one(prediction: str, gold: str) -> float:
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if same == 0:  # also the official answer when both normalise to nothing
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    return max(_em_one(prediction, g) for g in _gold_list(answers))


def f1(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD token-level F1 in [0, 1], the best over the gold answers."""
    return max(_f1_one(prediction, g) for g in _gold_list(answers))


def qa_metrics(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> dict:
    """Corpus EM and F1 in percent (DESIGN.md contract 2): {"em", "f1", "count"}."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} gold answer lists")
    if not predictions:
        raise ValueError("qa_metrics needs at least one prediction")
    em = sum(exact_match(p, a) for p, a in zip(predictions, answers))
    f = sum(f1(p, a) for p, a in zip(predictions, answers))
    n = len(predictions)
    return {"em": 100.0 * em / n, "f1": 100.0 * f / n, "count": n}


# --- DPR answer matching ---------------------------------------------------------------

# DPR's SimpleTokenizer: runs of letters, digits and combining marks, or any other single
# visible character. `regex` (a transformers dependency) has \p{..}; stdlib `re` does not.
_DPR_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=regex.UNICODE)


def dpr_tokenize(text: str) -> list[str]:
    """Lower-cased DPR SimpleTokenizer tokens of the NFD-normalised text."""
    text = unicodedata.normalize("NFD", text)
    return [m.group().lower() for m in _DPR_TOKEN.finditer(text)]


def _contains(tokens: list[str], sub: list[str]) -> bool:
    n = len(sub)
    return any(tokens[i : i + n] == sub for i in range(len(tokens) - n + 1))


@functools.lru_cache(maxsize=4096)
def _compile_answer_pattern(pattern: str) -> regex.Pattern:
    try:  # DPR's flags, and its `regex` engine
        return regex.compile(pattern, flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)
    except regex.error as e:
        raise ValueError(f"answer pattern {pattern!r} is not a valid regular expression: {e}") from e


def has_answer(text: str, answers: str | Sequence[str], mode: str = "string") -> bool:
    """DPR's answer matching: does the passage `text` contain one of `answers`?

    mode="string": after Unicode NFD normalisation and lowercasing, some answer's tokens are a
    contiguous run of the text's tokens (so "art" is not found in "party", and "U.S." matches
    "u . s ."). NFD makes composed and decomposed accents equal; it does not strip them
    ("Cafe" does not match "Café"). An answer with no tokens matches nothing (DPR would match
    every passage).
    mode="regex": each answer is a regular expression searched in the NFD text, ignoring case,
    as DPR does for CuratedTREC; an invalid pattern raises ValueError (DPR returns False).
    """
    answers = _gold_list(answers)
    if mode == "string":
        tokens = dpr_tokenize(text)
        for answer in answers:
            sub = dpr_tokenize(answer)
            if sub and _contains(tokens, sub):
                return True
        return False
    if mode == "regex":
        text = unicodedata.normalize("NFD", text)
        return any(_compile_answer_pattern(a).search(text) is not None for a in answers)
    raise ValueError(f"has_answer mode must be 'string' or 'regex', got {mode!r}")


def retrieval_recall(hits: Sequence[Sequence[bool]], ks: Sequence[int] = (1, 5, 20, 100)) -> dict[str, float]:
    """Top-K retrieval accuracy in percent: {"recall@K": % of questions with a hit in the top K}.

    hits[i][r] says whether the passage at rank r (best first) for question i has an answer.
    Only K up to the number retrieved (the longest list) is reported, so a run with 5 passages
    gives recall@1 and recall@5; a shorter list (a retriever that returned fewer) counts as
    having no hit past its end.
    """
    if not hits:
        raise ValueError("retrieval_recall needs at least one question")
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {list(ks)}")
    n_retrieved = max(len(h) for h in hits)
    # first_hit[i]: rank of the first answer-bearing passage, or None
    first_hit = [next((r for r, ok in enumerate(h) if ok), None) for h in hits]
    out = {}
    for k in sorted(set(ks)):
        if k > n_retrieved:
            continue
        found = sum(1 for r in first_hit if r is not None and r < k)
        out[f"recall@{k}"] = 100.0 * found / len(hits)
    return out
