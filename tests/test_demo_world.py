"""The demo's synthetic world: deterministic, held out by entity, hard to guess, real formats."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rag_e2e import demo_world
from rag_e2e.demo_world import build_word_tokenizer, make_world, world_texts, write_world
from rag_e2e.metrics import exact_match, has_answer, normalize_answer
from rag_e2e.passages import read_passages
from rag_e2e.qa_data import read_biencoder_json, read_jsonl_qa, read_qa_csv

SMALL = dict(n_entities=300, n_train=400, n_dev=30, n_test=60)
FILES = ["psgs.tsv", "train.jsonl", "dev.jsonl", "test.jsonl", "biencoder-train.json", "biencoder-dev.json",
         "dev.qa.csv", "test.qa.csv"]


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0)  # the demo's default size: ~0.5 s


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world(make_world(seed=3, **SMALL), out)
    return out


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        w = make_world(seed=seed, **SMALL)
        write_world(w, tmp_path / name)
        build_word_tokenizer(world_texts(w), tmp_path / name / "tok")
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert sorted(a) == sorted(FILES) and not any(n.endswith(".tmp") for n in a)
    assert a == b
    assert _digests(tmp_path / "a" / "tok") == _digests(tmp_path / "b" / "tok")
    assert a["psgs.tsv"] != c["psgs.tsv"] and a["train.jsonl"] != c["train.jsonl"]


def test_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    """Set iteration order changes with PYTHONHASHSEED; the world must not (other machines)."""
    write_world(make_world(seed=1, **SMALL), tmp_path / "here")
    args = ",".join(f"{k}={v}" for k, v in SMALL.items())
    code = ("import sys; from rag_e2e.demo_world import make_world, write_world; "
            f"write_world(make_world(seed=1, {args}), sys.argv[1])")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(demo_world.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env)
    assert _digests(tmp_path / "here") == _digests(tmp_path / "there")


def test_held_out_entities_are_never_mentioned_by_training_questions(world):
    train_entities = {q.entity for q in world.train}
    dev_entities, test_entities = {q.entity for q in world.dev}, {q.entity for q in world.test}
    assert not (train_entities & dev_entities) and not (train_entities & test_entities)
    assert not (dev_entities & test_entities)
    train_text = " ".join(q.question for q in world.train)
    for name in dev_entities | test_entities:
        assert not re.search(rf"\b{re.escape(name)}\b", train_text), name
    assert (len(world.train), len(world.dev), len(world.test)) == (3000, 100, 250)
    assert len(test_entities) >= 100  # spread over many entities, not a few with many questions


def test_passages_are_about_a_hundred_words_with_unique_ids_and_titles(world):
    lengths = [len(p.text.split()) for p in world.passages]
    assert min(lengths) >= 60 and max(lengths) <= 140, (min(lengths), max(lengths))
    assert 90 <= sum(lengths) / len(lengths) <= 115
    assert [p.id for p in world.passages] == [str(i + 1) for i in range(len(world.passages))]
    assert len({p.title for p in world.passages}) == len(world.passages) == 1500
    assert not any(re.search(r"[\t\r\n]", p.text + p.title) for p in world.passages)


def test_each_answer_is_in_its_gold_passage_and_not_in_its_question(world):
    by_id = {p.id: p for p in world.passages}
    for q in world.train + world.dev + world.test:
        gold = by_id[q.gold_passage_id]
        assert gold.title == q.entity
        assert has_answer(gold.text, q.answers), (q, gold.text)
        assert not has_answer(q.question, q.answers), q
        assert re.search(rf"\b{re.escape(q.entity)}\b", q.question), q  # a retriever can find it
        assert 1 <= len(q.answers[0].split()) <= 3


def test_no_answer_dominates_and_a_prior_cannot_guess(world):
    held_out = world.dev + world.test
    top_answer, top_count = Counter(normalize_answer(q.answers[0]) for q in held_out).most_common(1)[0]
    assert top_count / len(held_out) < 0.05, top_answer
    # The best passage-free guess: the commonest training answer for the question's relation.
    by_relation: dict[str, Counter] = {}
    for q in world.train:
        by_relation.setdefault(q.relation, Counter())[q.answers[0]] += 1
    guesses = [by_relation[q.relation].most_common(1)[0][0] for q in held_out]
    em = sum(exact_match(g, q.answers) for g, q in zip(guesses, held_out)) / len(held_out)
    assert em < 0.10, em
    assert len(by_relation) >= 15  # several relations over four kinds of entity


def test_questions_are_worded_unlike_passages(world):
    """A question's wording (its name removed) is never a sentence of its passage."""
    by_id = {p.id: p for p in world.passages}
    for q in world.test:
        relation_words = q.question.replace(q.entity, "").rstrip("?.").strip()
        assert relation_words.lower() not in by_id[q.gold_passage_id].text.lower(), q
    phrasings = Counter(re.sub(re.escape(q.entity), "X", q.question) for q in world.train)
    assert len(phrasings) >= 60  # ~4 paraphrases per relation


def test_files_parse_with_the_project_readers_and_dpr_layouts(small_dir):
    with open(small_dir / "psgs.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["id", "text", "title"] and all(len(r) == 3 for r in rows)
    store = read_passages(small_dir / "psgs.tsv")
    assert len(store) == len(rows) - 1 == SMALL["n_entities"]
    jsonl = [json.loads(line) for line in (small_dir / "test.jsonl").read_text().splitlines()]
    assert all(sorted(r) == ["answers", "gold_passage_id", "question"] for r in jsonl)
    assert [e.question for e in read_jsonl_qa(small_dir / "test.jsonl")] == [r["question"] for r in jsonl]
    csv_examples = read_qa_csv(small_dir / "test.qa.csv")
    assert [(e.question, e.answers) for e in csv_examples] == [(r["question"], r["answers"]) for r in jsonl]
    records = json.loads((small_dir / "biencoder-train.json").read_text())
    assert len(records) == SMALL["n_train"]
    for rec in records:
        assert {"question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"} <= set(rec)
        (pos,) = rec["positive_ctxs"]
        row = store[store.row_of(pos["passage_id"])]
        assert (row["title"], row["text"]) == (pos["title"], pos["text"])
    examples, skipped = read_biencoder_json(small_dir / "biencoder-dev.json")
    assert len(examples) == SMALL["n_dev"] and not any(skipped.values())


def test_word_tokenizer_round_trips_answers_and_covers_the_world(tmp_path, world):
    texts = world_texts(world)
    build_word_tokenizer(texts, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 4)
    assert 1000 < len(tok) < 6000, len(tok)  # small enough for a from-scratch generator on a CPU
    for q in world.test:
        ids = tok(text_target=q.answers[0])["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert normalize_answer(tok.decode(ids, skip_special_tokens=True)) == normalize_answer(q.answers[0])
    unk = tok.unk_token_id
    assert not any(unk in ids for ids in tok(texts[:3000] + texts[-3000:])["input_ids"])
    q, p = world.test[0], world.passages[0]
    pair = tok(q.question, p.text)["input_ids"]
    n_q = len(tok(q.question)["input_ids"])  # <s> q </s>
    assert pair[n_q - 1 : n_q + 1] == [tok.eos_token_id, tok.eos_token_id] and pair[-1] == tok.eos_token_id
    assert tok("zzyzx")["input_ids"] == [0, unk, 2]


def test_main_writes_the_world_and_the_tokenizer(tmp_path, capsys):
    demo_world.main([str(tmp_path / "w"), "--n-entities", "200", "--n-train", "100", "--n-dev", "10",
                     "--n-test", "20", "--lookalikes", "0", "--tokenizer-dir", str(tmp_path / "tok")])
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(FILES)
    assert AutoTokenizer.from_pretrained(tmp_path / "tok")("a")["input_ids"][0] == 0
    assert "200 passages" in capsys.readouterr().out


@pytest.mark.parametrize("sizes, message", [
    (dict(n_entities=10), "too small"),
    (dict(n_entities=100, n_dev=100, n_test=100), "need more than"),
    (dict(n_entities=100, n_train=5000, n_dev=5, n_test=5), "train:"),
])
def test_impossible_sizes_are_clear_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_world(**sizes)


def test_names_come_in_lookalike_clusters_and_are_mentioned_elsewhere(world):
    """The retriever's hard negatives: one-vowel variants of a name, and passing mentions."""
    titles = {p.title for p in world.passages}

    def variants(name):
        return {name[:i] + v + name[i + 1:] for i, ch in enumerate(name) if ch in "aeiou" for v in "aeiou"} - {name}

    with_twin = sum(bool(variants(t) & titles) for t in titles)
    assert with_twin / len(titles) > 0.5
    q = world.test[0]
    mentioned_in = [p for p in world.passages if q.entity in p.text and p.title != q.entity]
    assert len(mentioned_in) >= 1
    text = " ".join(p.text for p in world.passages)
    people = [p.title for p in world.passages if p.title.count(" ") == 1][:200]
    assert sum(text.count(n) for n in people) / len(people) > 4  # a name is in several passages


def test_value_pool_limits_every_kind_of_answer_and_keeps_the_world_valid():
    """value_pool=k: each kind of answer (towns, a year range, people, ...) takes at most k values."""
    pooled = make_world(seed=0, value_pool=7, **SMALL)
    free = make_world(seed=0, **SMALL)
    by_kind: dict[str, set] = {}
    by_id = {p.id: p for p in pooled.passages}
    for q in pooled.train + pooled.dev + pooled.test:
        (kind,) = {spec[0] for rels in demo_world.RELATIONS.values() for rel, spec in rels.items()
                   if rel == q.relation and q.question in [t.format(name=q.entity) for t in spec[2]]}
        by_kind.setdefault(kind, set()).add(q.answers[0])
        assert has_answer(by_id[q.gold_passage_id].text, q.answers) and not has_answer(q.question, q.answers)
    assert max(len(v) for v in by_kind.values()) <= 7
    assert {k for k, v in by_kind.items() if len(v) == 7} >= {"city", "person", "year:1700-2000"}
    years = [int(q.answers[0]) for q in pooled.train if q.relation == "birth_year"]
    assert years and all(1700 <= y <= 2000 for y in years)
    free_years = {q.answers[0] for q in free.train if q.relation == "birth_year"}
    assert len(free_years) > 7  # without the pool, answers spread over their whole range
