"""Retrieval with the encoder being trained: the passages training can use, the corpus indexed
under the current encoder, top-M search, distant supervision and top-K retrieval accuracy.

    corpus = index_corpus(encoder, tokenizer, pool, score="cosine")        # exact, in memory
    corpus = Indexer(tokenizer, pool, acc, run_dir / "index", index_cfg=IndexConfig("hnsw"))(encoder, step)
    r = retrieve(encoder, tokenizer, corpus, questions, top_m=100, max_query_length=64)
    evaluate_retrieval(encoder, tokenizer, store, dev_examples, ks=(1, 5, 20, 100))

Mining (`rag_e2e.mining`), retriever pretraining and its evaluation all search a `CorpusIndex`:
the FAISS index of `mining.index` over the store's embeddings under one encoder, built by
every process encoding a slice (`rag_e2e.rebuild.build_version`) when there are several.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from rag_e2e.embed import unit_rows
from rag_e2e.metrics import dpr_tokenize, retrieval_recall
from rag_e2e.passages import PassageStore, TokenizedPassages, tokenize_passages


# --- passages training can use -----------------------------------------------------------


class PassagePool:
    """Passage ids for training: the store's rows 0..N-1, then passages that only a training
    file holds (DPR positives or BM25 negatives missing from the corpus) at N, N+1, ...

    `add(ctx)` maps a DPR ctx {"title", "text", "passage_id"} to its id; `finalize()`
    tokenizes the extra passages in one batched call, with the store's template.
    """

    def __init__(self, store: Optional[PassageStore], store_tokens: Optional[TokenizedPassages],
                 tokenizer, max_length: int):
        if (store is None) != (store_tokens is None):
            raise ValueError("give both the passage store and its tokenized passages, or neither")
        if store is not None and len(store) != len(store_tokens):
            raise ValueError(f"store has {len(store)} passages, tokenized passages {len(store_tokens)}")
        self.store, self.store_tokens = store, store_tokens
        self.n_store = 0 if store is None else len(store)
        self.tokenizer, self.max_length = tokenizer, max_length
        self._extra: list[tuple[str, str]] = []  # (title, text)
        self._extra_key: dict[tuple, int] = {}
        self.extra_tokens: Optional[TokenizedPassages] = None

    def __len__(self) -> int:
        return self.n_store + len(self._extra)

    def add(self, ctx: dict) -> int:
        pid = ctx.get("passage_id")
        if pid is not None and self.store is not None:
            try:
                return self.store.row_of(str(pid))
            except KeyError:
                pass
        key = ("id", str(pid)) if pid is not None else ("text", ctx["title"], ctx["text"])
        if key not in self._extra_key:
            if self.extra_tokens is not None:
                raise RuntimeError("PassagePool.add after finalize()")
            self._extra_key[key] = self.n_store + len(self._extra)
            self._extra.append((ctx["title"], ctx["text"]))
        return self._extra_key[key]

    def finalize(self, batch_size: int = 2048) -> None:
        chunks, lengths = [], []
        for start in tqdm(range(0, len(self._extra), batch_size), desc="tokenizing training passages",
                          unit=" batch", disable=None, mininterval=2.0):
            part = self._extra[start: start + batch_size]
            enc = self.tokenizer([t for t, _ in part], [x for _, x in part], truncation="only_second",
                                 max_length=self.max_length)
            chunks += [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]
            lengths += [len(ids) for ids in enc["input_ids"]]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        self.extra_tokens = TokenizedPassages(tokens, offsets, {"kind": "retriever", "max_length": self.max_length})

    def tokens(self, i: int) -> np.ndarray:
        if i < self.n_store:
            return self.store_tokens.get(i)
        if self.extra_tokens is None:
            raise RuntimeError("PassagePool.tokens before finalize()")
        return self.extra_tokens.get(i - self.n_store)

    def text(self, i: int) -> str:
        return self.store[i]["text"] if i < self.n_store else self._extra[i - self.n_store][1]


class AnswerMatcher:
    """DPR's `has_answer` (string mode) for pool ids, with each passage tokenized once.

    Equal to `rag_e2e.metrics.has_answer(pool.text(i), answers)`; the cache is what makes
    masking b x n in-batch candidates per step and checking q x M mined ones affordable.
    """

    def __init__(self, text_of: Callable[[int], str], cache_size: int = 1 << 18):
        self._passage = functools.lru_cache(maxsize=cache_size)(self._tokenize_passage)
        self._text_of = text_of

    def _tokenize_passage(self, i: int) -> tuple[list[str], frozenset]:
        toks = dpr_tokenize(self._text_of(i))
        return toks, frozenset(toks)

    @staticmethod
    @functools.lru_cache(maxsize=1 << 16)
    def _answer_tokens(answer: str) -> tuple[str, ...]:
        return tuple(dpr_tokenize(answer))

    def contains(self, i: int, answers: Sequence[str]) -> bool:
        toks, vocab = self._passage(int(i))
        for answer in answers:
            sub = self._answer_tokens(answer)
            if not sub or not vocab.issuperset(sub):  # an answer with no tokens matches nothing
                continue
            n = len(sub)
            if any(toks[j: j + n] == list(sub) for j in range(len(toks) - n + 1)):
                return True
        return False


# --- encoding and retrieval with the current encoder ---------------------------------------


class CorpusIndex:
    """The store's passages under one document encoder: a FAISS index over their embeddings
    and the (N, d) matrix it was built from (fp16; a memmap for a large corpus). With
    score="cosine" the rows are unit vectors and `search` normalises the queries."""

    def __init__(self, index, vectors: np.ndarray, score: str = "dot"):
        if score not in ("dot", "cosine"):
            raise ValueError(f"score must be 'dot' or 'cosine', got {score!r}")
        if vectors.shape != (index.ntotal, index.dim):
            raise ValueError(f"embeddings {vectors.shape} do not fit an index of {index.ntotal} x {index.dim}")
        self.index, self.vectors, self.score = index, vectors, score

    def __len__(self) -> int:
        return self.index.ntotal

    def queries(self, q: np.ndarray) -> np.ndarray:
        """(q, d) question embeddings as the index scores them (unit rows for cosine)."""
        q = np.asarray(q, dtype=np.float32)
        return q / np.linalg.norm(q, axis=1, keepdims=True).clip(min=1e-12) if self.score == "cosine" else q

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, d) question embeddings -> scores (q, k) float32, store rows (q, k) int64, best first."""
        scores, ids = self.index.search(self.queries(q), min(k, len(self)))
        return scores, ids.astype(np.int64)


def index_corpus(encoder, tokenizer, pool: PassagePool, score: str = "dot", index_cfg=None, batch_size: int = 0,
                 device=None, work_dir: Optional[str | os.PathLike] = None, version: int = 0, step: int = 0,
                 accelerator=None) -> Optional[CorpusIndex]:
    """Encode the store with the current document encoder and index it (`index_cfg`: an
    `IndexConfig`, default exact flat search).

    work_dir=None: this process encodes everything and the index lives in memory (tests, small
    corpora). With a work_dir, every process of `accelerator` encodes a slice of the passages
    and the main process builds the index in work_dir/vNNNNN (`rag_e2e.rebuild.build_version`:
    a temporary name, then a rename; work_dir/CURRENT points at it) and gets it back; the
    other processes get None. Every process must call it then.
    """
    from rag_e2e.index import IndexConfig, build_index, index_params
    from rag_e2e.rebuild import RebuildConfig, build_version

    if pool.n_store == 0:
        raise ValueError("mining and evaluation need a passage corpus (data.passages)")
    index_cfg = index_cfg or IndexConfig()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if work_dir is None:
        from rag_e2e.embed import encode_passages

        vectors = encode_passages(encoder, pool.store_tokens, pad_id, batch_size, device)  # (N, d) fp16
        vectors = unit_rows(vectors) if score == "cosine" else vectors
        return CorpusIndex(build_index(vectors.astype(np.float32), index_cfg.kind, **index_params(index_cfg)),
                           vectors, score)
    index, vectors = build_version(encoder, pool.store_tokens, pad_id, RebuildConfig(index=index_cfg, batch_size=batch_size),
                                   work_dir, version, step, accelerator, normalize=score == "cosine", everywhere=False)
    return None if index is None else CorpusIndex(index, vectors, score)


@dataclass
class Retrieved:
    scores: np.ndarray  # (q, m) float32, best first
    ids: np.ndarray  # (q, m) int64 store rows
    queries: np.ndarray  # (q, d) float32 question embeddings, as the index scores them


def retrieve(encoder, tokenizer, corpus: CorpusIndex, questions: Sequence[str], top_m: int,
             max_query_length: int, batch_size: int = 0, device=None) -> Retrieved:
    """The top min(top_m, N) store rows per question from `corpus` (the store under the
    current document encoder), with the current query encoder."""
    from rag_e2e.embed import encode_texts_as_queries

    qv = encode_texts_as_queries(encoder, tokenizer, list(questions), max_query_length, batch_size, device,
                                 progress=True)  # (q, d)
    scores, ids = corpus.search(qv, top_m)
    return Retrieved(scores, ids, corpus.queries(qv))


def distant_positives(retrieved: Retrieved, answers: Sequence[Sequence[str]], matcher: AnswerMatcher) -> np.ndarray:
    """Distant supervision (DPR for TriviaQA, with BM25 there): each question's positive is
    the highest-ranked retrieved passage that contains an answer -> (q,) ids, -1 where none."""
    out = np.full(len(answers), -1, dtype=np.int64)
    for i, ans in enumerate(answers):
        for pid in retrieved.ids[i]:
            if pid >= 0 and matcher.contains(int(pid), ans):  # -1: an approximate index found fewer
                out[i] = pid
                break
    return out


# --- evaluation ------------------------------------------------------------------------------


def evaluate_retrieval(encoder, tokenizer, store: PassageStore, examples: Sequence, ks=(1, 5, 20, 100),
                       passages: Optional[TokenizedPassages] = None, match: str = "auto", batch_size: int = 0,
                       max_query_length: int = 64, max_passage_length: int = 256, device=None,
                       corpus: Optional[CorpusIndex] = None, score: str = "dot") -> dict:
    """Top-K retrieval accuracy (percent) over the whole store -> {"recall@K": pct}, K <= len(store).

    A hit is a passage that contains an answer (DPR's has_answer), or with match="gold" one of
    the example's gold passages (`QAExample.gold_ids`: positive_ctxs or gold_passage_id);
    "auto" uses gold ids when every example has one in the store. Also returns "recall_match"
    (which one was used). `corpus`: the store indexed under `encoder` (`index_corpus`), if
    already built; else an exact index is built here, in memory, with `score`."""
    if passages is None:
        passages = tokenize_passages(store, tokenizer, "retriever", max_passage_length)
    pool = PassagePool(store, passages, tokenizer, max_passage_length)
    if corpus is None:
        corpus = index_corpus(encoder, tokenizer, pool, score, batch_size=batch_size, device=device)
    ks = sorted(k for k in set(ks) if k <= len(store)) or [len(store)]
    r = retrieve(encoder, tokenizer, corpus, [ex.question for ex in examples], max(ks), max_query_length,
                 batch_size, device)
    gold = [store.rows_of(ex.gold_ids()) for ex in examples]
    if match == "auto":
        match = "gold" if all(gold) else "answer"
    if match == "gold":
        hits = [[int(z) in g for z in row] for g, row in zip(gold, r.ids)]
    elif match == "answer":
        matcher = AnswerMatcher(pool.text)
        hits = [[z >= 0 and matcher.contains(int(z), ex.answers) for z in row] for ex, row in zip(examples, r.ids)]
    else:
        raise ValueError(f"match must be 'auto', 'answer' or 'gold', got {match!r}")
    return {**retrieval_recall(hits, ks), "recall_match": match}


class Indexer:
    """The store indexed under the encoder as it is now, as versions work_dir/vNNNNN (only the
    newest kept). A collective call: every process encodes a slice; the main process gets the
    `CorpusIndex`, the others None."""

    def __init__(self, tokenizer, pool: PassagePool, acc, work_dir: Path, score: str = "dot", index_cfg=None,
                 batch_size: int = 0):
        self.tokenizer, self.pool, self.acc, self.work_dir = tokenizer, pool, acc, Path(work_dir)
        self.score, self.index_cfg, self.batch_size = score, index_cfg, batch_size
        done = sorted(self.work_dir.glob("v[0-9][0-9][0-9][0-9][0-9]"))
        self.version = int(done[-1].name[1:]) + 1 if done else 0
        self._last: Optional[tuple[int, Optional[CorpusIndex]]] = None  # (step, index) until released

    def __call__(self, encoder, step: int) -> Optional[CorpusIndex]:
        """The index under `encoder` at optimizer step `step`; built once per step (the caller
        takes no step in between), so a second call at the same step encodes nothing."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        corpus = index_corpus(encoder, self.tokenizer, self.pool, self.score, self.index_cfg, self.batch_size,
                              self.acc.device, self.work_dir, self.version, step, self.acc)
        if self.acc.is_main_process:  # a memmap of a deleted version stays readable until dropped
            for old in sorted(self.work_dir.glob("v[0-9][0-9][0-9][0-9][0-9]"))[:-1]:
                shutil.rmtree(old, ignore_errors=True)
        self.version += 1
        self._last = (step, corpus)
        return corpus

    def release(self) -> None:
        """Drop the index in memory (it stays on disk); the next call builds anew."""
        self._last = None
