"""Retriever encoders: pooling, shared/separate weights, save/load round trip, DPR checkpoints."""

import torch
from transformers import BertConfig, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

from conftest import tiny_bert, word_tokenizer
from rag_e2e.encoders import BiEncoder, RetrieverConfig, load_retriever, pool


def test_pooling():
    h = torch.arange(24, dtype=torch.float).reshape(2, 3, 4)
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(h, m, "cls"), h[:, 0])
    torch.testing.assert_close(pool(h, m, "mean")[0], h[0, :2].mean(0))


def test_round_trip_and_sharing(tmp_path):
    tok = word_tokenizer("a b c".split())
    enc = BiEncoder(tiny_bert(len(tok), seed=1), tiny_bert(len(tok), seed=2), pooling="mean", normalize=True)
    ids, mask = torch.tensor([[0, 5, 6, 2]]), torch.ones(1, 4, dtype=torch.long)
    q, d = enc.encode_queries(ids, mask), enc.encode_docs(ids, mask)
    assert not torch.allclose(q, d) and abs(float(q.norm()) - 1) < 1e-5
    enc.save_pretrained(tmp_path / "r", tokenizer=tok)
    again, tok2 = load_retriever(RetrieverConfig(query_model=str(tmp_path / "r")))
    torch.testing.assert_close(again.encode_queries(ids, mask), q)
    torch.testing.assert_close(again.encode_docs(ids, mask), d)
    shared = BiEncoder(tiny_bert(len(tok)), None)
    assert shared.shared and shared.doc_encoder is shared.query_encoder


def test_dpr_checkpoints_load_the_right_tower(tmp_path):
    cfg = DPRConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    ctx = DPRContextEncoder(cfg).eval()
    ctx.save_pretrained(tmp_path / "ctx")
    qe = DPRQuestionEncoder(cfg).eval()
    qe.save_pretrained(tmp_path / "q")
    tok = word_tokenizer("a b".split())
    for d in ("ctx", "q"):
        tok.save_pretrained(tmp_path / d)
    enc, _ = load_retriever(RetrieverConfig(query_model=str(tmp_path / "q"), doc_model=str(tmp_path / "ctx"),
                                            pooling="cls"))
    enc.eval()
    ids, mask = torch.tensor([[0, 5, 6, 2]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_docs(ids, mask), ctx(ids, attention_mask=mask).pooler_output)
        torch.testing.assert_close(enc.encode_queries(ids, mask), qe(ids, attention_mask=mask).pooler_output)
