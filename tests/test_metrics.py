"""Metrics against the official SQuAD v1.1 script and DPR's answer matching."""

import re
import string
from collections import Counter

import pytest

from rag_e2e import metrics as M

# --- the official SQuAD v1.1 evaluate script's functions, verbatim in behaviour -----------


def ref_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_f1_score(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def ref_exact_match_score(prediction, ground_truth):
    return ref_normalize_answer(prediction) == ref_normalize_answer(ground_truth)


def ref_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


CASES = [
    ("The Eiffel Tower", ["Eiffel Tower"]),
    ("an apple a day", ["apple day", "An apple"]),
    ("Theatre", ["the atre"]),  # "the" inside a word is not an article
    ("The-End", ["end"]),  # punctuation goes first: "theend" keeps its "the"
    ("Café  de   Flore", ["cafe de flore", "Café de Flore!"]),
    ("São Paulo", ["sao paulo"]),
    ("U.S.A.", ["USA", "U S A"]),
    ("“quoted” words", ["quoted words"]),  # curly quotes are not ASCII punctuation
    ("", ["anything"]),
    ("", [""]),
    ("   ", ["a"]),
    ("the the the", ["the"]),
    ("1,000,000 people", ["1000000", "one million people"]),
    ("Barack Obama", ["Obama", "President Barack Hussein Obama", "Barack Obama Sr."]),
    ("obama obama", ["Obama"]),
    ("Tab\tand\nnewline", ["tab and newline"]),
    ("ÉCOLE", ["école"]),
    ("rock 'n' roll", ["rock n roll"]),
]


@pytest.mark.parametrize("prediction,answers", CASES)
def test_matches_official_squad_v11(prediction, answers):
    assert M.normalize_answer(prediction) == ref_normalize_answer(prediction)
    assert M.exact_match(prediction, answers) == float(
        ref_max_over_ground_truths(ref_exact_match_score, prediction, answers)
    )
    assert M.f1(prediction, answers) == pytest.approx(ref_max_over_ground_truths(ref_f1_score, prediction, answers))


def test_hand_checked_values():
    assert M.normalize_answer("  The  Quick, brown-fox!  ") == "quick brownfox"
    assert M.exact_match("the Beatles", "Beatles") == 1.0
    assert M.exact_match("Beatles band", ["The Beatles"]) == 0.0
    # pred {beatles, band}, gold {beatles}: P = 1/2, R = 1, F1 = 2/3
    assert M.f1("Beatles band", ["The Beatles"]) == pytest.approx(2 / 3)
    # best over gold answers, not the mean
    assert M.f1("new york city", ["york", "New York City"]) == 1.0
    assert M.f1("", ["Paris"]) == 0.0
    assert M.exact_match("", [""]) == 1.0
    assert M.f1("", [""]) == 0.0  # SQuAD v1.1's answer for two empty strings


def test_scores_in_unit_interval_and_answers_checked():
    for pred, answers in CASES:
        assert 0.0 <= M.f1(pred, answers) <= 1.0
        assert M.exact_match(pred, answers) in (0.0, 1.0)
    with pytest.raises(ValueError, match="no gold answers"):
        M.exact_match("x", [])
    with pytest.raises(TypeError, match="strings"):
        M.f1("x", ["ok", 3])


def test_qa_metrics_percent_and_count():
    out = M.qa_metrics(["Paris", "Beatles band", "nope"], [["Paris"], ["The Beatles"], "yes"])
    assert out["count"] == 3
    assert out["em"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        M.qa_metrics(["a", "b"], [["a"]])


# --- DPR answer matching ---------------------------------------------------------------


def test_dpr_tokenizer_splits_like_dpr():
    assert M.dpr_tokenize("Hello, World! U.S. 3.14 it's") == [
        "hello", ",", "world", "!", "u", ".", "s", ".", "3", ".", "14", "it", "'", "s",
    ]


@pytest.mark.parametrize(
    "text,answers,expected",
    [
        ("The capital of France is Paris.", ["paris"], True),  # case
        ("He was born in New York City in 1950", ["new york city"], True),  # multi-token
        ("He was born in New York in 1950", ["New York City"], False),
        ("they threw a party last night", ["art"], False),  # partial token
        ("they threw a party last night", ["Party"], True),
        ("the U.S. Army", ["U.S."], True),  # punctuation split on both sides
        ("the U.S. Army", ["US"], False),
        ("The state of Washington, D.C.", ["Washington D.C."], False),  # the comma token breaks the run
        ("Le Café de Flore", ["Cafe"], False),  # NFD keeps the accent as a combining mark
        ("Le Cafe\u0301 de Flore", ["Caf\u00e9"], True),  # decomposed text, composed answer
        ("Le Caf\u00e9 de Flore", ["Cafe\u0301"], True),  # composed text, decomposed answer
        ("Zürich is in Switzerland", ["ZÜRICH"], True),
        ("Score: 3-2 after extra time", ["3 - 2"], True),
        ("nothing here", ["missing", "here"], True),  # any of several answers
        ("nothing here", "here", True),  # a bare string is one answer
        ("some text", ["!!"], False),
        ("some text", ["   "], False),  # an answer without tokens matches nothing
    ],
)
def test_has_answer_string(text, answers, expected):
    assert M.has_answer(text, answers) is expected


def test_has_answer_regex_mode():
    text = "The Eiffel Tower was completed in 1889 in Paris."
    assert M.has_answer(text, [r"18[0-9]{2}"], mode="regex")
    assert M.has_answer(text, [r"eiffel\s+tower"], mode="regex")  # ignores case
    assert not M.has_answer(text, [r"^paris"], mode="regex")
    assert M.has_answer("Cafe\u0301 noir", ["caf\u00e9"], mode="regex") is False  # pattern is not normalised
    assert M.has_answer("Caf\u00e9 noir", ["cafe\u0301"], mode="regex")  # text is NFD
    with pytest.raises(ValueError, match="not a valid regular expression"):
        M.has_answer(text, ["(unclosed"], mode="regex")
    with pytest.raises(ValueError, match="mode"):
        M.has_answer(text, ["x"], mode="fuzzy")


def test_dpr_tokenizer_unicode_classes():
    # NFD splits "ï" into i + U+0308 (a mark, kept in the word); CJK letters form one run;
    # an emoji (So) is a token on its own; a zero-width space (Cf) and a no-break space (Zs) vanish
    text = "Naïve 東京タワー😀x\u200by\u00a0z ½"
    assert M.dpr_tokenize(text) == ["nai\u0308ve", "東京タワー", "😀", "x", "y", "z", "½"]


def test_retrieval_recall_keys_and_values():
    hits = [
        [True, False, False, False, False],
        [False, False, True, False, False],
        [False] * 5,
        [False, False, False, False, True],
    ]
    assert M.retrieval_recall(hits) == {"recall@1": 25.0, "recall@5": 75.0}
    assert M.retrieval_recall(hits, ks=(3, 1)) == {"recall@1": 25.0, "recall@3": 50.0}
    # a shorter list counts as no hit past its end; K up to the longest list
    assert M.retrieval_recall([[False, True], [False]], ks=(1, 2, 5)) == {"recall@1": 0.0, "recall@2": 50.0}
    with pytest.raises(ValueError):
        M.retrieval_recall([])
    with pytest.raises(ValueError):
        M.retrieval_recall(hits, ks=(0,))
