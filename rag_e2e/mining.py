"""Negatives for retriever training: random, provided (DPR's BM25), hardest, semi-hard.

Mining encodes the corpus with the current encoder, retrieves the top M passages per
question and records them with their scores (`MinedCandidates`, saved as .npz without
pickle), so that the selection thresholds can change without encoding again. Selection
never returns the question's positive or a passage that contains one of its answers (DPR's
`has_answer`): such passages are not negatives, they are unlabelled positives.

Semi-hard negatives lie in a window below the positive's score s_p:
    s_p - margin_hi <= s_n <= s_p - margin_lo        (absolute margins)
    s_n <= max_ratio * s_p                           (relative: NV-Retriever's TopK-PercPos,
                                                      Moreira et al. 2024; scale-free)
    rank_lo <= rank(n) < rank_hi                     (rank among the M retrieved)
The hardest negatives (top of the list) are often false negatives; the window skips them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from rag_e2e.embed import unit_rows
from rag_e2e.index import IndexConfig
from rag_e2e.retrieval import AnswerMatcher, CorpusIndex, PassagePool, retrieve

logger = logging.getLogger(__name__)


@dataclass
class MiningConfig:
    strategy: Literal["random", "provided", "hardest", "semi_hard"] = "semi_hard"
    num_negatives: int = 1  # h mined negatives per question, besides the in-batch ones
    top_m: int = 100  # passages retrieved per question when mining
    margin_lo: Optional[float] = None  # keep s_n <= s_p - margin_lo (None: no bound)
    margin_hi: Optional[float] = None  # keep s_n >= s_p - margin_hi (None: no bound)
    max_ratio: Optional[float] = None  # keep s_n <= max_ratio * s_p, e.g. 0.95
    rank_lo: int = 0  # skip the rank_lo best retrieved (likely unlabelled positives)
    rank_hi: Optional[int] = None  # keep ranks < rank_hi (None: all top_m)
    remine_every: int = 1  # epochs between re-mining from a rebuilt index; 0: mine once
    fill_random: bool = True  # too few candidates in the window: top up with random ones (counted)
    candidates_file: Optional[str] = None  # reuse saved MinedCandidates (.npz) for the first round
    seed: int = 0
    # the corpus index each round searches (and evaluation): exact flat by default; hnsw / ivfpq /
    # sq8 for a corpus the size of Wikipedia (see README's planning table)
    index: IndexConfig = field(default_factory=IndexConfig)


# --- mined candidates, stored with their scores ------------------------------------------


@dataclass
class MinedCandidates:
    """The top M retrieved per question, best first, with the positive's own score."""

    qids: np.ndarray  # (q,) str
    pos_ids: np.ndarray  # (q,) int64 pool id of each question's positive
    pos_scores: np.ndarray  # (q,) float32 s(q, positive)
    cand_ids: np.ndarray  # (q, m) int64 retrieved pool ids
    cand_scores: np.ndarray  # (q, m) float32
    excluded: np.ndarray  # (q, m) bool: the positive itself or a passage containing an answer

    def __post_init__(self):
        q, m = self.cand_ids.shape
        for name, shape in (("qids", (q,)), ("pos_ids", (q,)), ("pos_scores", (q,)),
                            ("cand_scores", (q, m)), ("excluded", (q, m))):
            if getattr(self, name).shape != shape:
                raise ValueError(f"MinedCandidates.{name} has shape {getattr(self, name).shape}, expected {shape}")

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, qids=self.qids.astype(str), pos_ids=self.pos_ids, pos_scores=self.pos_scores,
                     cand_ids=self.cand_ids, cand_scores=self.cand_scores, excluded=self.excluded)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MinedCandidates":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(**{k: z[k] for k in ("qids", "pos_ids", "pos_scores", "cand_ids",
                                                 "cand_scores", "excluded")})
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path}: not a mined-candidates file ({e})") from None


def window_mask(cand_scores: np.ndarray, pos_scores: np.ndarray, cfg: MiningConfig) -> np.ndarray:
    """(q, m) retrieved scores (best first), (q,) positive scores -> (q, m) bool, True inside
    the semi-hard window (score margins, relative margin, rank window)."""
    q, m = cand_scores.shape
    assert pos_scores.shape == (q,), f"pos_scores must be ({q},), got {pos_scores.shape}"
    ranks = np.arange(m)[None, :]  # (1, m)
    ok = (ranks >= cfg.rank_lo) & (ranks < (m if cfg.rank_hi is None else cfg.rank_hi))
    s_p = pos_scores[:, None]  # (q, 1)
    if cfg.margin_lo is not None:
        ok = ok & (cand_scores <= s_p - cfg.margin_lo)
    if cfg.margin_hi is not None:
        ok = ok & (cand_scores >= s_p - cfg.margin_hi)
    if cfg.max_ratio is not None:
        ok = ok & (cand_scores <= cfg.max_ratio * s_p)
    return np.broadcast_to(ok, (q, m))


# --- selection -----------------------------------------------------------------------------


def _random_fill(rng: np.random.Generator, need: int, pos_id: int, answers: Sequence[str],
                 taken: set, matcher: AnswerMatcher, n_random: int) -> list[int]:
    """Up to `need` random ids in 0..n_random-1: not the positive, not taken, no answer."""
    out: list[int] = []
    for _ in range(20 * need + 20):  # bounded: a corpus where every passage has the answer ends
        if len(out) == need:
            break
        i = int(rng.integers(n_random))
        if i != pos_id and i not in taken and not matcher.contains(i, answers):
            out.append(i)
            taken.add(i)
    return out


def _from_candidates(rng, ids: np.ndarray, ok: np.ndarray, h: int, sample: bool) -> list[int]:
    """h ids where ok: the first h (hardest) or a uniform sample without replacement."""
    ids = ids[ok]
    _, first = np.unique(ids, return_index=True)  # a passage retrieved twice counts once
    ids = ids[np.sort(first)]
    if not sample or len(ids) <= h:
        return ids[:h].tolist()
    return rng.choice(ids, size=h, replace=False).tolist()


def select_negatives(cfg: MiningConfig, rng: np.random.Generator, pos_ids: Sequence[int],
                     answers: Sequence[Sequence[str]], matcher: AnswerMatcher, n_random: int,
                     mined: Optional[MinedCandidates] = None,
                     provided: Optional[Sequence[Sequence[int]]] = None) -> tuple[list[list[int]], dict]:
    """h negatives per question by `cfg.strategy` -> (per-question id lists, counts).

    random: uniform over pool ids 0..n_random-1. provided: a sample of the file's hard
    negatives (DPR shuffles them each epoch). hardest: the best-scoring mined ones.
    semi_hard: a sample from the window. Every strategy drops the positive and passages
    containing an answer; with `fill_random`, a question left short is topped up with
    random negatives and counted in counts["filled_random"].
    """
    h, q = cfg.num_negatives, len(pos_ids)
    if cfg.strategy in ("hardest", "semi_hard"):
        if mined is None or len(mined.pos_ids) != q:
            raise ValueError(f"strategy {cfg.strategy!r} needs mined candidates for all {q} questions")
        window = window_mask(mined.cand_scores, mined.pos_scores, cfg) if cfg.strategy == "semi_hard" else None
    if cfg.strategy == "provided" and (provided is None or len(provided) != q):
        raise ValueError(f"strategy 'provided' needs the file's hard negatives for all {q} questions")
    counts = {"short": 0, "filled_random": 0}
    out = []
    for i in range(q):
        pos = int(pos_ids[i])
        if cfg.strategy == "random":
            chosen = []
        elif cfg.strategy == "provided":
            ids = np.asarray(provided[i], dtype=np.int64)
            ok = np.array([j != pos and not matcher.contains(j, answers[i]) for j in ids], dtype=bool)
            chosen = _from_candidates(rng, ids, ok, h, sample=True)
        else:
            ok = ~mined.excluded[i] & (mined.cand_ids[i] != pos)  # the positive, even if not flagged
            if window is not None:
                ok &= window[i]
            chosen = _from_candidates(rng, mined.cand_ids[i], ok, h, sample=cfg.strategy == "semi_hard")
        if len(chosen) < h and (cfg.fill_random or cfg.strategy == "random"):
            extra = _random_fill(rng, h - len(chosen), pos, answers[i], set(chosen), matcher, n_random)
            counts["filled_random"] += len(extra) if cfg.strategy != "random" else 0
            chosen += extra
        counts["short"] += len(chosen) < h
        out.append(chosen)
    if counts["short"] or counts["filled_random"]:
        logger.info("negatives (%s): %d of %d questions short of %d, %d topped up at random",
                    cfg.strategy, counts["short"], q, h, counts["filled_random"])
    return out, counts


def exclusion_mask(pos_ids: Sequence[int], answers: Sequence[Sequence[str]], cand_ids: np.ndarray,
                   offset: int, matcher: Optional[AnswerMatcher]) -> np.ndarray:
    """(b,) positives, (n,) candidate pool ids (positive of question i at offset + i) -> (b, n)
    bool: the same passage as i's positive elsewhere in the pool, or (with a matcher) a
    passage containing one of i's answers. Never True at i's own positive."""
    b, n = len(pos_ids), len(cand_ids)
    mask = np.zeros((b, n), dtype=bool)
    for i in range(b):
        mask[i] = cand_ids == pos_ids[i]
        if matcher is not None:
            mask[i] |= [matcher.contains(int(c), answers[i]) for c in cand_ids]
        mask[i, offset + i] = False
    return mask


def _positive_vectors(encoder, tokenizer, pool: PassagePool, pos_ids: np.ndarray, corpus: CorpusIndex,
                      batch_size: int, device) -> np.ndarray:
    """(q,) pool ids -> (q, d) embeddings as the index holds them; store rows from the
    corpus, the training file's extra passages encoded here."""
    from rag_e2e.embed import encode_passages

    out = np.empty((len(pos_ids), corpus.vectors.shape[1]), dtype=np.float32)
    in_store = pos_ids < pool.n_store
    out[in_store] = corpus.vectors[np.sort(pos_ids[in_store])][np.argsort(np.argsort(pos_ids[in_store]))]
    if (~in_store).any():
        extra_rows = np.unique(pos_ids[~in_store]) - pool.n_store
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        emb = encode_passages(encoder, pool.extra_tokens, pad_id, batch_size, device, rows=extra_rows)
        emb = unit_rows(emb) if corpus.score == "cosine" else emb
        where = {int(r) + pool.n_store: j for j, r in enumerate(extra_rows)}
        out[~in_store] = emb[[where[int(p)] for p in pos_ids[~in_store]]]
    return out


def mine(encoder, tokenizer, pool: PassagePool, corpus: CorpusIndex, qids: Sequence[str], questions: Sequence[str],
         answers: Sequence[Sequence[str]], pos_ids: Sequence[int], matcher: AnswerMatcher, top_m: int,
         max_query_length: int, batch_size: int = 0, device=None) -> MinedCandidates:
    """Retrieve the top M per question from `corpus` (the store under the current encoder)
    and flag the candidates that are the positive or contain an answer."""
    pos_ids = np.asarray(pos_ids, dtype=np.int64)
    r = retrieve(encoder, tokenizer, corpus, questions, top_m, max_query_length, batch_size, device)
    pos_vecs = _positive_vectors(encoder, tokenizer, pool, pos_ids, corpus, batch_size, device)
    pos_scores = (r.queries * pos_vecs).sum(1).astype(np.float32)  # (q,)
    excluded = (r.ids == pos_ids[:, None]) | (r.ids < 0)  # (q, m); -1: an approximate index found fewer
    for i in tqdm(range(len(pos_ids)), desc="checking mined candidates for answers", unit=" q",
                  disable=None, mininterval=2.0):
        for j in np.flatnonzero(~excluded[i]):
            excluded[i, j] = matcher.contains(int(r.ids[i, j]), answers[i])
    return MinedCandidates(np.asarray(qids, dtype=str), pos_ids, pos_scores, r.ids, r.scores.astype(np.float32),
                           excluded)
