"""Index kinds against exact search, save/load, provenance checks, in-place updates, bad files."""

import json

import faiss
import numpy as np
import pytest
import torch

from rag_e2e.index import (IndexError_, IndexMismatchError, UnsupportedUpdate, build_index, encoder_fingerprint,
                           load_embeddings, load_index)

KINDS = ["flat", "hnsw", "sq8", "ivfpq"]


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # OpenMP spin-waiting makes faiss training crawl on a busy 2-core machine; one thread is steady.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n, d=32, clusters=40, seed=0, noise=0.5):
    """Gaussian blobs: what passage embeddings look like (topics), unlike uniform noise."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(clusters, d))
    return (centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d))).astype(np.float32)


def exact_topk(x, q, k):
    return torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, k).indices.numpy()  # (q, k)


def recall(found, exact):
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact)]))


@pytest.fixture(scope="module")
def data():
    x = clustered(4000, seed=0)
    q = clustered(100, seed=1)
    return x, q, exact_topk(x, q, 10)


@pytest.mark.parametrize("kind,floor", [("flat", 1.0), ("hnsw", 0.95), ("sq8", 0.95), ("ivfpq", 0.8)])
def test_recall_against_exact_search(data, kind, floor):
    x, q, exact = data
    index = build_index(x, kind)
    scores, ids = index.search(q, 10)
    assert scores.shape == ids.shape == (100, 10) and ids.dtype == np.int64
    assert (np.diff(scores, axis=1) <= 1e-5).all(), "best first"
    assert recall(ids, exact) >= floor, (kind, recall(ids, exact))


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_identical(data, tmp_path, kind):
    x, q, _ = data
    index = build_index(x, kind).with_provenance(passages="abc", encoder="enc1", step=7)
    index.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix", expect_passages="abc", expect_count=4000, expect_encoder="enc1",
                        expect_dim=32)
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    assert loaded.kind == kind and loaded.params == index.params and loaded.meta["step"] == 7


def test_fp16_matrix_is_referenced_not_copied_and_gives_exact_rows(data, tmp_path):
    x, q, _ = data
    np.save(tmp_path / "embeddings.npy", x.astype(np.float16))
    emb = load_embeddings(tmp_path / "embeddings.npy", expect_count=4000, expect_dim=32)
    index = build_index(emb, "ivfpq")
    index.save(tmp_path / "index-ivfpq")
    assert not (tmp_path / "index-ivfpq" / "vectors.npy").exists()
    loaded = load_index(tmp_path / "index-ivfpq")
    ids = np.array([[3, 2999], [0, 17]])
    np.testing.assert_array_equal(loaded.embeddings(ids), x.astype(np.float16)[ids])
    _, found = loaded.search(q, 5)
    scores = np.einsum("qd,qkd->qk", q, loaded.embeddings(found).astype(np.float32))
    np.testing.assert_allclose(loaded.search(q, 5)[0], scores, rtol=1e-5)  # re-ranked scores are exact


@pytest.mark.parametrize("key,kwargs", [
    ("passage store fingerprint", {"expect_passages": "other"}),
    ("passage count", {"expect_count": 3999}),
    ("document encoder fingerprint", {"expect_encoder": "enc2"}),
    ("embedding dimension", {"expect_dim": 768}),
])
def test_metadata_mismatch_names_what_differs(data, tmp_path, key, kwargs):
    build_index(data[0], "flat").with_provenance(passages="abc", encoder="enc1").save(tmp_path / "ix")
    with pytest.raises(IndexMismatchError, match=key):
        load_index(tmp_path / "ix", **kwargs)


@pytest.mark.parametrize("kind", ["flat", "sq8", "ivfpq"])
def test_add_then_remove_restores_results(data, kind):
    x, q, _ = data
    index = build_index(x[:3500], kind)
    before = index.search(q, 10)
    new_ids = np.arange(3500, 4000)
    index.add(x[3500:], new_ids)
    assert index.ntotal == 4000
    assert np.isin(index.search(q, 10)[1], new_ids).any(), "added passages are found"
    index.remove(new_ids)
    for a, b in zip(before, index.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    top = before[1][:, 0]
    index.remove(np.unique(top))
    assert not np.isin(index.search(q, 10)[1], top).any(), "a removed id is never returned"
    with pytest.raises(KeyError, match="not in the index"):
        index.remove(top[:1])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:2], np.array([5, 6]))


def test_updates_survive_save_load(data, tmp_path):
    x, q, _ = data
    index = build_index(x[:3500], "ivfpq")
    index.add(x[3500:], np.arange(3500, 4000))
    index.remove(np.arange(0, 100))
    index.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.embeddings(np.array([3999])), x[3999:].astype(np.float16))


def test_hnsw_adds_but_cannot_remove(data):
    x, q, _ = data
    index = build_index(x[:2000], "hnsw")
    index.add(x[2000:2500], np.arange(2000, 2500))
    assert recall(index.search(q, 10)[1], exact_topk(x[:2500], q, 10)) >= 0.95
    with pytest.raises(UnsupportedUpdate, match="hnsw index cannot remove"):
        index.remove(np.array([1]))


def test_bad_parameters_are_errors(data):
    x = data[0]
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(x, "lsh")
    with pytest.raises(ValueError, match="unknown index parameter 'efsearch'"):
        build_index(x, "hnsw", efsearch=10)
    with pytest.raises(ValueError, match="must divide the dimension"):
        build_index(x, "ivfpq", pq_m=5)


def test_bad_files_are_clear_errors(data, tmp_path):
    x = data[0]
    np.save(tmp_path / "emb.npy", x.astype(np.float16))
    with pytest.raises(IndexMismatchError, match="holds 4000 embeddings but there are 4001 passages"):
        load_embeddings(tmp_path / "emb.npy", expect_count=4001)
    with pytest.raises(IndexMismatchError, match="32-dim embeddings, expected 768"):
        load_embeddings(tmp_path / "emb.npy", expect_dim=768)
    np.save(tmp_path / "f32.npy", x)
    with pytest.raises(IndexError_, match="expected a float16"):
        load_embeddings(tmp_path / "f32.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(IndexError_, match="junk.npy is not a readable"):
        load_embeddings(tmp_path / "junk.npy")
    build_index(x, "flat").save(tmp_path / "ix")
    (tmp_path / "ix" / "index.faiss").write_bytes(b"\x00" * 64)
    with pytest.raises(IndexError_, match="index.faiss is not a readable FAISS index"):
        load_index(tmp_path / "ix")
    (tmp_path / "ix" / "meta.json").write_text("{oops")
    with pytest.raises(IndexError_, match="meta.json: not valid JSON"):
        load_index(tmp_path / "ix")
    with pytest.raises(IndexError_, match="not an index folder"):
        load_index(tmp_path / "nowhere")


def test_encoder_fingerprint_tracks_weights():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    fp = encoder_fingerprint(a)
    assert fp == encoder_fingerprint(a) and len(fp) == 16
    with torch.no_grad():
        a.weight[0, 0] += 1e-3
    assert encoder_fingerprint(a) != fp
    assert encoder_fingerprint(a.to(torch.bfloat16)) != encoder_fingerprint(a.float())


# ---- python -m index_build.build ------------------------------------------------------------------

def _encoded_dir(tmp_path, x):
    """What index_build.encode leaves behind: embeddings.npy (fp16) + embeddings.json."""
    out = tmp_path / "run"
    out.mkdir()
    np.save(out / "embeddings.npy", x.astype(np.float16))
    (out / "embeddings.json").write_text(json.dumps({"count": len(x), "dim": x.shape[1], "passages": "p1",
                                                     "encoder": "e1", "shard_size": 1000}))
    return out


def test_build_cli_writes_checked_index_and_bad_input_overwrites_nothing(data, tmp_path):
    from index_build.build import main

    x, q, exact = data
    out = _encoded_dir(tmp_path, x)
    result = main([f"out_dir={out}", "index.kind=sq8", "step=42"])
    assert result["passages"] == 4000 and 32 <= result["bytes_per_passage"] < 4 * 32
    index = load_index(out / "index-sq8", expect_passages="p1", expect_encoder="e1", expect_count=4000)
    assert index.meta["step"] == 42 and recall(index.search(q, 10)[1], exact) >= 0.95
    assert json.loads((out / "metrics.json").read_text())["index-sq8"]["kind"] == "sq8"
    before = (out / "index-sq8" / "index.faiss").read_bytes()
    np.save(out / "embeddings.npy", x[:3999].astype(np.float16))  # one row short of the passages
    with pytest.raises(IndexMismatchError, match="3999 embeddings but there are 4000 passages"):
        main([f"out_dir={out}", "index.kind=sq8"])
    np.save(out / "embeddings.npy", x[:, :16].astype(np.float16))  # wrong dimension
    with pytest.raises(IndexMismatchError, match="16-dim embeddings, expected 32"):
        main([f"out_dir={out}", "index.kind=sq8"])
    assert (out / "index-sq8" / "index.faiss").read_bytes() == before, "the earlier index is untouched"
    assert not (out / "index-sq8.tmp").exists()
    with pytest.raises(IndexError_, match="run `python -m index_build.encode` first"):
        main([f"out_dir={tmp_path / 'empty'}"])
