"""The index in service during joint training, rebuilt every N steps from the live document encoder.

    live = LiveIndex.build(enc, passages, pad_id, RebuildConfig(every=500), work_dir=run_dir / "index")
    for step in ...:
        scores, ids = live.search(q_emb, k)          # (b, k) each, numpy
        d_emb = live.doc_embeddings(ids)              # (b, k, d) fp16 stored rows (paper mode)
        ...optimizer step...
        stats = live.maybe_rebuild(step, enc)         # None, or figures to log

A rebuild re-encodes the corpus (every process encodes a slice; the slices meet on disk), builds
the new index in `work_dir/vNNNNN.tmp`, renames it to `vNNNNN`, points `work_dir/CURRENT` at it,
and only then replaces the in-memory references: training never sees a half-built index. A
failure anywhere (any process) leaves the previous version serving and logs a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rag_e2e.embed import encode_passages, unit_rows
from rag_e2e.index import FaissIndex, IndexConfig, build_index, encoder_fingerprint, index_params, load_index
from rag_e2e.passages import TokenizedPassages

log = logging.getLogger(__name__)


@dataclass
class RebuildConfig:
    every: int = 0  # optimizer steps between rebuilds; 0 = never (the paper's frozen document index)
    index: IndexConfig = field(default_factory=IndexConfig)  # kind and parameters of each rebuilt index
    batch_size: int = 0  # passages per forward pass while re-encoding; 0 = 32 on CPU, 256 on GPU
    max_tokens: Optional[int] = None  # cap padded tokens per batch
    keep: int = 2  # index versions kept on disk, the one in service included
    probe_queries: int = 256  # recent queries kept to measure score drift at each rebuild
    probe_k: int = 10  # top-k compared between the stale and the fresh index


def _to_numpy(q) -> np.ndarray:
    if isinstance(q, torch.Tensor):
        q = q.detach().float().cpu().numpy()
    return np.ascontiguousarray(q, dtype=np.float32)


def score_drift(queries: np.ndarray, ids: np.ndarray, stale: np.ndarray, fresh: np.ndarray) -> float:
    """Mean |s_stale - s_fresh| over the passages the stale index retrieved.

    queries (q, d), ids (q, k), stale / fresh: (N, d) embedding matrices (old / new encoder).
    """
    assert queries.ndim == 2 and ids.shape[0] == queries.shape[0]
    s_old = np.einsum("qd,qkd->qk", queries, stale[ids.reshape(-1)].reshape(*ids.shape, -1).astype(np.float32))
    s_new = np.einsum("qd,qkd->qk", queries, fresh[ids.reshape(-1)].reshape(*ids.shape, -1).astype(np.float32))
    return float(np.abs(s_old - s_new).mean())  # (q, k) -> scalar


def topk_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of ids shared by two (q, k) retrieval results."""
    return float(np.mean([len(set(x) & set(y)) / a.shape[1] for x, y in zip(a, b)]))


class LiveIndex:
    """The index in service, its version, and the fp16 embeddings matrix it was built from."""

    def __init__(self, index: FaissIndex, embeddings: np.ndarray, passages: TokenizedPassages, pad_id: int,
                 cfg: RebuildConfig, work_dir: str | os.PathLike, version: int = 0, built_step: int = 0,
                 accelerator=None):
        if embeddings.shape != (len(passages), index.dim):
            raise ValueError(f"embeddings {embeddings.shape} do not fit {len(passages)} passages x {index.dim}")
        self.index, self.embeddings = index, embeddings
        self.passages, self.pad_id, self.cfg = passages, pad_id, cfg
        self.work_dir = Path(work_dir)
        self.version, self.built_step = version, built_step
        self.accelerator = accelerator
        self._probe: Optional[np.ndarray] = None  # (m, d) recent queries
        self._last_attempt = built_step

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, encoder, passages: TokenizedPassages, pad_id: int, cfg: RebuildConfig,
              work_dir: str | os.PathLike, step: int = 0, accelerator=None) -> "LiveIndex":
        """Encode the corpus with `encoder` and serve it as version 0."""
        index, emb = build_version(encoder, passages, pad_id, cfg, work_dir, 0, step, accelerator)
        return cls(index, emb, passages, pad_id, cfg, work_dir, 0, step, accelerator)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, passages: TokenizedPassages, pad_id: int, cfg: RebuildConfig,
             work_dir: str | os.PathLike, expect_encoder: Optional[str] = None, accelerator=None) -> "LiveIndex":
        """Serve an index folder (from index_build or a previous run) checked against the passages."""
        index = load_index(index_dir, expect_passages=passages.meta.get("passages"), expect_count=len(passages),
                           expect_encoder=expect_encoder)
        if index.vectors is None:
            raise ValueError(f"{index_dir} records no embeddings matrix: build it with index_build")
        version = json.loads((Path(index_dir) / "meta.json").read_text()).get("version", 0)
        return cls(index, index.vectors, passages, pad_id, cfg, work_dir, version, index.meta.get("step") or 0,
                   accelerator)

    @classmethod
    def resume(cls, work_dir: str | os.PathLike, passages: TokenizedPassages, pad_id: int, cfg: RebuildConfig,
               accelerator=None) -> Optional["LiveIndex"]:
        """The version that `work_dir/CURRENT` points at (a resumed run), or None."""
        current = Path(work_dir) / "CURRENT"
        if not current.is_file():
            return None
        return cls.load(Path(work_dir) / current.read_text().strip() / "index", passages, pad_id, cfg, work_dir,
                        accelerator=accelerator)

    # ---- what the training loop calls --------------------------------------------------------
    def search(self, q_emb, k: int) -> tuple[np.ndarray, np.ndarray]:
        """q_emb (b, d) tensor or array -> scores (b, k) float32, ids (b, k) int64, best first."""
        q = _to_numpy(q_emb)
        self._remember(q)
        return self.index.search(q, k)

    def doc_embeddings(self, ids) -> np.ndarray:
        """Stored fp16 embeddings of passage ids (any shape) -> (*ids.shape, d), exact, never decoded codes."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.embeddings)):
            raise IndexError(f"passage ids must lie in 0..{len(self.embeddings) - 1} (-1 means the search found "
                             f"fewer than k passages), got {ids.min()}..{ids.max()}")
        return self.embeddings[ids.reshape(-1)].reshape(*ids.shape, self.embeddings.shape[1])

    def staleness(self, step: int) -> int:
        """Optimizer steps since the embeddings in service were computed."""
        return step - self.built_step

    def swap(self, index: FaissIndex, embeddings: Optional[np.ndarray] = None, step: Optional[int] = None) -> None:
        """Serve another index (e.g. hnsw instead of flat at evaluation); same passages, same dimension."""
        embeddings = self.embeddings if embeddings is None else embeddings
        if index.dim != self.index.dim or embeddings.shape != self.embeddings.shape:
            raise ValueError(f"cannot swap in an index of dim {index.dim} / embeddings {embeddings.shape} "
                             f"for dim {self.index.dim} / {self.embeddings.shape}")
        self.index, self.embeddings = index, embeddings  # one step between training steps: never half
        self.built_step = self.built_step if step is None else step

    def maybe_rebuild(self, step: int, encoder) -> Optional[dict]:
        """Rebuild when `every` steps have passed since the last build (or failed attempt)."""
        every = self.cfg.every
        if every <= 0 or step - self.built_step < every or step - self._last_attempt < every:
            return None
        self._last_attempt = step
        return self.rebuild(step, encoder)

    def rebuild(self, step: int, encoder) -> dict:
        """Re-encode, build, swap in; returns figures to log. On failure the old index keeps serving."""
        t0 = time.time()
        since = self.staleness(step)
        try:
            index, emb = build_version(encoder, self.passages, self.pad_id, self.cfg, self.work_dir,
                                       self.version + 1, step, self.accelerator)
        except Exception as e:  # noqa: BLE001 - any failure must leave training running on the old index
            log.warning("index rebuild at step %d failed (%s: %s): version %d, built at step %d, stays in service",
                        step, type(e).__name__, e, self.version, self.built_step)
            return {"index/rebuild_failed": 1.0, "index/version": float(self.version),
                    "index/steps_since_rebuild": float(since)}
        stats = self._drift(index, emb)
        self.index, self.embeddings, self.version, self.built_step = index, emb, self.version + 1, step
        self._prune()
        stats.update({"index/version": float(self.version), "index/steps_since_rebuild": float(since),
                      "index/rebuild_s": time.time() - t0, "index/rebuild_failed": 0.0})
        log.info("index v%d in service from step %d (%d steps after the last): drift %.4g, top-%d overlap %.3f, %.1fs",
                 self.version, step, since, stats["index/drift"], self.cfg.probe_k, stats["index/topk_overlap"],
                 stats["index/rebuild_s"])
        return stats

    # ---- internals ---------------------------------------------------------------------------
    def _remember(self, q: np.ndarray) -> None:
        keep = self.cfg.probe_queries
        self._probe = q[-keep:] if self._probe is None else np.concatenate([self._probe, q])[-keep:]

    def _drift(self, fresh_index: FaissIndex, fresh: np.ndarray) -> dict:
        if self._probe is None:
            return {"index/drift": float("nan"), "index/topk_overlap": float("nan")}
        k = min(self.cfg.probe_k, self.index.ntotal, fresh_index.ntotal)
        _, stale_ids = self.index.search(self._probe, k)
        _, fresh_ids = fresh_index.search(self._probe, k)
        return {"index/drift": score_drift(self._probe, np.maximum(stale_ids, 0), self.embeddings, fresh),
                "index/topk_overlap": topk_overlap(stale_ids, fresh_ids)}

    def _prune(self) -> None:
        """Delete versions older than the `keep` newest (never the one in service)."""
        if _rank_world(self.accelerator)[0] != 0:
            return
        versions = sorted(p for p in self.work_dir.glob("v[0-9][0-9][0-9][0-9][0-9]") if p.is_dir())
        for old in versions[: max(0, len(versions) - max(self.cfg.keep, 1))]:
            if old.name != f"v{self.version:05d}":
                shutil.rmtree(old, ignore_errors=True)


def _rank_world(accelerator) -> tuple[int, int]:
    return (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)


def _all_ok(ok: bool, accelerator) -> bool:
    """True when every process succeeded (a collective: every process must call it)."""
    if _rank_world(accelerator)[1] == 1:
        return ok
    failed = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(failed, reduction="sum").item()) == 0.0


def build_version(encoder, passages: TokenizedPassages, pad_id: int, cfg: RebuildConfig, work_dir: str | os.PathLike,
                  version: int, step: int, accelerator=None, normalize: bool = False,
                  everywhere: bool = True) -> tuple[Optional[FaissIndex], Optional[np.ndarray]]:
    """Encode the corpus and publish it as work_dir/vNNNNN; returns (index, fp16 embeddings memmap).

    Every process encodes its slice of the rows to disk; the main process merges the slices,
    builds the index in vNNNNN.tmp, renames it and points work_dir/CURRENT at it. Raises
    (on every process) if any process failed; nothing is then published. `normalize`: unit
    rows (cosine scores by inner product). `everywhere=False`: only the main process loads the
    index; the others get (None, None).
    """
    rank, world = _rank_world(accelerator)
    work_dir = Path(work_dir)
    name = f"v{version:05d}"
    tmp, final = work_dir / f"{name}.tmp", work_dir / name
    error: Optional[Exception] = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a failed attempt
            tmp.mkdir(parents=True)
        if world > 1:
            accelerator.wait_for_everyone()
        rows = np.array_split(np.arange(len(passages)), world)[rank]
        part = encode_passages(encoder, passages, pad_id, batch_size=cfg.batch_size, rows=rows,
                               max_tokens=cfg.max_tokens, progress=rank == 0)  # (n_r, d)
        part = unit_rows(part) if normalize else part
        np.save(tmp / f"part-{rank:03d}.npy", part)
    except Exception as e:  # noqa: BLE001 - reported to every process below
        error = e
    if not _all_ok(error is None, accelerator):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error or RuntimeError(f"another process failed to encode its slice for index {name}")
    index = None
    if rank == 0:
        try:
            index = _publish(tmp, final, version, step, encoder, passages, cfg, world)
        except Exception as e:  # noqa: BLE001
            error = e
            shutil.rmtree(tmp, ignore_errors=True)
    if not _all_ok(error is None, accelerator):
        raise error or RuntimeError(f"the main process failed to build index {name}")
    if index is None:  # the other processes read what the main process published
        if not everywhere:
            return None, None
        index = load_index(final / "index")
    return index, index.vectors


def _publish(tmp: Path, final: Path, version: int, step: int, encoder, passages: TokenizedPassages,
             cfg: RebuildConfig, world: int) -> FaissIndex:
    emb = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.float16,
                                    shape=(len(passages), encoder.dim))  # (N, d)
    start = 0
    for r in range(world):
        part = np.load(tmp / f"part-{r:03d}.npy", mmap_mode="r", allow_pickle=False)
        emb[start: start + len(part)] = part
        start += len(part)
    if start != len(passages):
        raise ValueError(f"the encoded slices hold {start} rows for {len(passages)} passages")
    emb.flush()
    del emb
    for r in range(world):
        (tmp / f"part-{r:03d}.npy").unlink()
    index = build_index(np.load(tmp / "embeddings.npy", mmap_mode="r"), cfg.index.kind, **index_params(cfg.index))
    index.with_provenance(passages=passages.meta.get("passages"),
                          encoder=encoder_fingerprint(encoder.doc_encoder), step=step)
    index.meta["version"] = version
    index.save(tmp / "index")  # the embeddings are referenced as ../embeddings.npy: valid after the rename
    shutil.rmtree(final, ignore_errors=True)  # a leftover of a crash after its rename, never in service
    os.replace(tmp, final)
    (final.parent / "CURRENT.tmp").write_text(final.name)
    os.replace(final.parent / "CURRENT.tmp", final.parent / "CURRENT")
    index.vectors = np.load(final / "embeddings.npy", mmap_mode="r")  # by its published name
    return index
