"""MIPS indexes over passage embeddings (DESIGN.md contract #5).

    index = build_index(vectors, "hnsw")         # float32 (n, d) (or the fp16 memmap), ids 0..n-1
    scores, ids = index.search(queries, k)       # (q, k) each, best first, inner products
    index.with_provenance(passages=store.fingerprint, encoder=encoder_fingerprint(enc), step=0)
    index.save(path); index = load_index(path, expect_passages=store.fingerprint, expect_count=len(store))

Kinds: `flat` (exact), `hnsw` (graph, native inner product), `ivfpq` (inverted lists +
product-quantised codes, trained on a sample), `sq8` (8-bit scalar codes, exhaustive).
Ids are passage rows. `add`/`remove` update an index in place where faiss can
(`hnsw` cannot remove). With `rerank > 0` a search takes k*rerank candidates and re-scores
them exactly against the stored fp16 embeddings, so PQ's coarse codes only pick
candidates; the stored matrix is also what paper-mode training reads (`embeddings(ids)`),
never vectors reconstructed from quantised codes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Optional

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)
KINDS = ("flat", "hnsw", "ivfpq", "sq8")
_DEFAULT_RERANK = {"ivfpq": 8}


class IndexError_(ValueError):
    """A bad index file or a mismatch between an index and what it is used with."""


class IndexMismatchError(IndexError_):
    """The index was built over other passages, another encoder, or another dimension."""


class UnsupportedUpdate(IndexError_):
    """The index kind cannot do this update (faiss HNSW has no deletion)."""


@dataclass
class IndexConfig:
    kind: Literal["flat", "hnsw", "ivfpq", "sq8"] = "flat"
    nlist: int = 0  # ivfpq inverted lists; 0 = 4*sqrt(n), at most train_sample/39. More: faster search, slower training
    nprobe: int = 32  # ivfpq lists visited per query: higher = better recall, slower search
    pq_m: int = 0  # ivfpq sub-quantizers (= bytes per code at 8 bits); must divide d; 0 = d/4
    pq_bits: int = 8  # bits per sub-quantizer code
    hnsw_m: int = 32  # hnsw graph degree: higher = better recall, ~8*M more bytes per passage
    ef_construction: int = 80  # hnsw build beam: higher = better graph, slower build
    ef_search: int = 128  # hnsw search beam: higher = better recall, slower search
    rerank: int = -1  # re-score k*rerank candidates from the fp16 embeddings; -1 = kind default (ivfpq 8, else 0)
    train_sample: int = 262144  # vectors sampled to train ivfpq / sq8
    seed: int = 0  # training sample and k-means seed
    use_gpu: bool = True  # search on faiss-gpu (flat, ivfpq, sharded over all GPUs) when there is one
    add_batch: int = 65536  # vectors converted to float32 and added at a time (bounds build memory)


def index_params(cfg: IndexConfig) -> dict:
    """The keyword arguments of `build_index` for a config (everything except kind)."""
    return {k: v for k, v in asdict(cfg).items() if k != "kind"}


def encoder_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's state dict (names, dtypes, shapes, bytes): which weights built an index."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_embeddings(path: str | os.PathLike, expect_count: Optional[int] = None,
                    expect_dim: Optional[int] = None) -> np.ndarray:
    """The stored fp16 embeddings (n, d), memory-mapped read-only; bad files raise naming the file."""
    path = Path(path)
    if not path.is_file():
        raise IndexError_(f"embeddings file {path} does not exist")
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise IndexError_(f"{path} is not a readable .npy embeddings matrix: {e}") from None
    if emb.ndim != 2 or emb.dtype != np.float16:
        raise IndexError_(f"{path}: expected a float16 (n, d) matrix, got {emb.dtype} of shape {emb.shape}")
    if expect_count is not None and emb.shape[0] != expect_count:
        raise IndexMismatchError(f"{path} holds {emb.shape[0]} embeddings but there are {expect_count} passages")
    if expect_dim is not None and emb.shape[1] != expect_dim:
        raise IndexMismatchError(f"{path} holds {emb.shape[1]}-dim embeddings, expected {expect_dim}")
    return emb


def _inner(index: faiss.Index) -> faiss.Index:
    """The index under an IndexIDMap2 (where the search parameters live)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def _set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    inner = _inner(index)
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = nprobe
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = ef_search


def _maybe_gpu(index: faiss.Index, kind: str, use_gpu: bool) -> faiss.Index:
    """A copy on all GPUs (sharded) where faiss-gpu can hold this kind; the CPU index otherwise."""
    if not use_gpu or kind not in ("flat", "ivfpq") or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return index
    try:
        co = faiss.GpuMultipleClonerOptions()
        co.shard = True  # each GPU holds 1/G of the passages, rather than a full copy
        co.useFloat16 = True  # flat: fp16 storage loses nothing (the embeddings are fp16); ivfpq: fp16 tables
        return faiss.index_cpu_to_all_gpus(index, co=co)
    except (RuntimeError, AttributeError) as e:  # e.g. a PQ code size faiss-gpu does not support
        log.warning("faiss-gpu cannot hold this %s index (%s); searching on CPU", kind, e)
        return index


class FaissIndex:
    """A FAISS index whose ids are passage rows, with its parameters and provenance."""

    def __init__(self, index: faiss.Index, kind: str, params: dict, meta: Optional[dict] = None,
                 vectors: Optional[np.ndarray] = None, present: Optional[np.ndarray] = None):
        self.index = index
        self.kind = kind
        self.params = params
        self.meta = {"count": index.ntotal, "passages": None, "encoder": None, "step": None, **(meta or {})}
        self.vectors = vectors  # fp16 (n, d) stored embeddings (memmap or array): rerank and embeddings()
        self.present = np.ones(index.ntotal, dtype=bool) if present is None else present  # id -> in index
        self._added: dict[int, np.ndarray] = {}  # fp16 rows of ids added past the stored matrix
        self._search_index: Optional[faiss.Index] = None
        if int(self.present.sum()) != index.ntotal:
            raise IndexError_(f"id map holds {int(self.present.sum())} ids but the faiss index {index.ntotal}")

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def rerank(self) -> int:
        return int(self.params.get("rerank", 0) or 0)

    def with_provenance(self, passages: Optional[str] = None, encoder: Optional[str] = None,
                        step: Optional[int] = None) -> "FaissIndex":
        """Record the corpus fingerprint, encoder fingerprint and training step the index was built from."""
        self.meta.update(passages=passages, encoder=encoder, step=step)
        return self

    def set_search_params(self, nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> None:
        """Change the speed/recall trade-off of a built index (ivfpq nprobe, hnsw efSearch)."""
        self.params["nprobe"] = nprobe or self.params.get("nprobe", 32)
        self.params["ef_search"] = ef_search or self.params.get("ef_search", 128)
        _set_search_params(self.index, self.params["nprobe"], self.params["ef_search"])
        self._search_index = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: (q, d) -> scores (q, k) float32, ids (q, k) int64, best first.

        An id of -1 (score -inf) only where fewer than k passages are reachable.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        assert queries.ndim == 2 and queries.shape[1] == self.dim, \
            f"queries must be (q, {self.dim}), got {queries.shape}"
        if k > self.ntotal:
            raise ValueError(f"k={k} is larger than the index ({self.ntotal} passages)")
        if self._search_index is None:
            self._search_index = _maybe_gpu(self.index, self.kind, self.params.get("use_gpu", False))
        if self.rerank <= 0:
            scores, ids = self._search_index.search(queries, k)
            scores[ids < 0] = -np.inf
            return scores, ids
        _, cand = self._search_index.search(queries, min(k * self.rerank, self.ntotal))  # (q, c)
        return exact_rerank(queries, cand, self.embeddings(np.maximum(cand, 0)), k)

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Stored fp16 embeddings of passage ids (any shape) -> (*ids.shape, d) float16."""
        if self.vectors is None:
            raise IndexError_("this index keeps no stored embeddings (build it from the fp16 matrix, or rerank > 0)")
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        n = len(self.vectors)
        out = np.empty((len(flat), self.dim), dtype=np.float16)
        base = flat < n
        order = np.argsort(flat[base], kind="stable")  # sorted reads are sequential on a memmap
        out[np.flatnonzero(base)[order]] = self.vectors[flat[base][order]]
        if self._added:  # added ids (past the matrix, or re-added below it) come from memory
            for i in range(len(flat)):
                row = self._added.get(int(flat[i]))
                if row is not None:
                    out[i] = row
                elif not base[i]:
                    raise KeyError(f"passage id {int(flat[i])} has no stored embedding")
        elif not base.all():
            raise KeyError(f"passage ids {flat[~base][:5].tolist()} have no stored embedding")
        return out.reshape(*ids.shape, self.dim)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add passages (float (m, d)) under ids (m,) that are not in the index."""
        vectors = np.asarray(vectors)
        ids = np.asarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or ids.shape != (len(vectors),):
            raise ValueError(f"add needs vectors (m, {self.dim}) and ids (m,), got {vectors.shape} and {ids.shape}")
        if len(np.unique(ids)) != len(ids) or (ids < 0).any():
            raise ValueError("ids to add must be distinct and non-negative")
        if len(self.present) <= ids.max():
            self.present = np.concatenate([self.present, np.zeros(ids.max() + 1 - len(self.present), bool)])
        if self.present[ids].any():
            raise ValueError(f"passage ids {ids[self.present[ids]][:5].tolist()} are already in the index: remove them first")
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self.present[ids] = True
        if self.vectors is not None:
            for i, v in zip(ids.tolist(), vectors.astype(np.float16)):
                self._added[i] = v
        self._search_index = None

    def remove(self, ids: np.ndarray) -> None:
        """Remove passages by id; every id must be in the index. HNSW cannot: UnsupportedUpdate."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if self.kind == "hnsw":
            raise UnsupportedUpdate("an hnsw index cannot remove passages (faiss HNSW has no deletion): "
                                    "rebuild it, or use kind flat, sq8 or ivfpq")
        inside = (ids >= 0) & (ids < len(self.present))
        inside[inside] = self.present[ids[inside]]
        absent = ids[~inside]
        if len(absent):
            raise KeyError(f"passage ids {absent[:5].tolist()} are not in the index")
        removed = self.index.remove_ids(ids)
        assert removed == len(ids), f"faiss removed {removed} of {len(ids)} ids"
        self.present[ids] = False
        for i in ids.tolist():
            self._added.pop(i, None)
        self._search_index = None

    def save(self, path: str | os.PathLike) -> None:
        """Write index.faiss, meta.json and the id map (temporary names, then renamed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(path / "index.faiss.tmp"))
        _save_npy(path / "present.npy", self.present)
        vectors_ref = _save_vectors(path, self.vectors, self._added)
        meta = {**self.meta, "kind": self.kind, "params": self.params, "ntotal": self.ntotal,
                "dim": self.dim, "vectors": vectors_ref, "faiss": faiss.__version__, "saved": time.time()}
        (path / "meta.json.tmp").write_text(json.dumps(meta, indent=2))
        os.replace(path / "index.faiss.tmp", path / "index.faiss")
        os.replace(path / "meta.json.tmp", path / "meta.json")  # last: a folder with meta.json is complete


def exact_rerank(queries: np.ndarray, cand: np.ndarray, cand_vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidates exactly and keep the best k.

    queries (q, d) float32, cand (q, c) ids (-1 = none), cand_vecs (q, c, d) -> scores (q, k), ids (q, k).
    """
    q, c = cand.shape
    assert cand_vecs.shape[:2] == (q, c) and queries.shape == (q, cand_vecs.shape[2])
    scores = np.einsum("qd,qcd->qc", queries, cand_vecs.astype(np.float32))  # (q, c)
    scores[cand < 0] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (q, k)
    return np.take_along_axis(scores, top, 1), np.take_along_axis(cand, top, 1)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished folder `tmp` in the place of `final` by renames (never a half-written folder)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _save_vectors(path: Path, vectors: Optional[np.ndarray], added: dict) -> Optional[str]:
    """Record where the stored embeddings are: a path to the memmapped file, or a copy in the folder."""
    if added:
        _save_npy(path / "added_ids.npy", np.array(sorted(added), dtype=np.int64))
        _save_npy(path / "added_vectors.npy", np.stack([added[i] for i in sorted(added)]))
    else:
        for name in ("added_ids.npy", "added_vectors.npy"):
            (path / name).unlink(missing_ok=True)
    if vectors is None:
        return None
    source = getattr(vectors, "filename", None)
    if source is not None and np.load(source, mmap_mode="r").shape != vectors.shape:
        source = None  # a slice of a memmapped file: its rows are not the whole file's
    if source is not None and Path(source).resolve() != (path / "vectors.npy").resolve():
        return os.path.relpath(Path(source).resolve(), path.resolve())
    if source is None:
        _save_npy(path / "vectors.npy", np.asarray(vectors, dtype=np.float16))
    return "vectors.npy"


def _resolve(kind: str, n: int, d: int, params: dict) -> dict:
    """IndexConfig defaults <- params, with the automatic values filled in; unknown keys are an error."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r} (expected one of {list(KINDS)})")
    valid = {f.name for f in fields(IndexConfig)} - {"kind"}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"unknown index parameter {unknown[0]!r} (valid: {', '.join(sorted(valid))})")
    p = index_params(IndexConfig(kind=kind, **params))
    if p["rerank"] < 0:
        p["rerank"] = _DEFAULT_RERANK.get(kind, 0)
    if kind == "ivfpq":
        sample = min(n, p["train_sample"])  # k-means wants >= 39 training points a list
        p["nlist"] = p["nlist"] or int(max(1, min(4 * np.sqrt(n), sample // 39)))
        p["pq_m"] = p["pq_m"] or (d // 4 if d % 4 == 0 else d)
        if d % p["pq_m"]:
            raise ValueError(f"pq_m={p['pq_m']} must divide the dimension {d}")
        need = max(p["nlist"], 2 ** p["pq_bits"])
        if min(n, p["train_sample"]) < need:
            raise ValueError(f"ivfpq with nlist={p['nlist']}, pq_bits={p['pq_bits']} needs {need} training vectors, "
                             f"got {min(n, p['train_sample'])}: lower pq_bits / nlist, or use kind flat")
    return p


def _make(kind: str, d: int, p: dict) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "ivfpq":  # IVF stores ids itself and can remove them: no id map needed
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, p["nlist"], p["pq_m"], p["pq_bits"], ip)
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, p["hnsw_m"], ip)
        inner.hnsw.efConstruction = p["ef_construction"]
    elif kind == "sq8":
        inner = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, ip)
    else:
        inner = faiss.IndexFlatIP(d)
    return faiss.IndexIDMap2(inner)


def _train_sample(vectors: np.ndarray, size: int, seed: int) -> np.ndarray:
    n = len(vectors)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)  # (m, d)


def build_index(vectors: np.ndarray, kind: str = "flat", **params) -> FaissIndex:
    """vectors: float32 (n, d) (or the fp16 memmap from `load_embeddings`), row i gets id i.

    params: the fields of IndexConfig (nlist, nprobe, pq_m, pq_bits, hnsw_m, ef_construction,
    ef_search, rerank, train_sample, seed, use_gpu, add_batch).
    """
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"vectors must be a non-empty (n, d) matrix, got shape {vectors.shape}")
    n, d = vectors.shape
    p = _resolve(kind, n, d, params)
    index = _make(kind, d, p)
    if not index.is_trained:
        inner = _inner(index)
        if isinstance(inner, faiss.IndexIVF):
            inner.cp.seed = p["seed"]
        t0 = time.time()
        index.train(_train_sample(vectors, p["train_sample"], p["seed"]))
        log.info("trained %s on %d vectors in %.1fs", kind, min(n, p["train_sample"]), time.time() - t0)
    _set_search_params(index, p["nprobe"], p["ef_search"])
    for start in tqdm(range(0, n, p["add_batch"]), desc=f"adding to {kind} index", unit=" batch",
                      mininterval=2.0, disable=None if n > p["add_batch"] else True):
        chunk = np.ascontiguousarray(vectors[start: start + p["add_batch"]], dtype=np.float32)
        index.add_with_ids(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
    # Keep the stored fp16 rows where they are free (a memmap) or needed (re-ranking).
    stored = vectors if vectors.dtype == np.float16 else (vectors.astype(np.float16) if p["rerank"] > 0 else None)
    return FaissIndex(index, kind, p, vectors=stored)


def _read_meta(path: Path) -> dict:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise IndexError_(f"{meta_file} not found: not an index folder")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise IndexError_(f"{meta_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("kind", "params", "ntotal", "dim"):
        if key not in meta:
            raise IndexError_(f"{meta_file}: missing key {key!r}")
    return meta


def _check_expected(path: Path, meta: dict, expect: dict) -> None:
    """Each expectation given must match what the index was built from; the error says which."""
    names = {"passages": "passage store fingerprint", "count": "passage count",
             "encoder": "document encoder fingerprint", "dim": "embedding dimension"}
    for key, want in expect.items():
        if want is None:
            continue
        have = meta["dim"] if key == "dim" else meta.get(key)
        if have != want:
            raise IndexMismatchError(
                f"{path}: index was built with {names[key]} {have!r} but {want!r} is in use: "
                f"rebuild the index (python -m index_build.build) or load the matching one")


def _load_vectors(path: Path, meta: dict, embeddings) -> Optional[np.ndarray]:
    if embeddings is not None:
        if isinstance(embeddings, (str, os.PathLike)):
            return load_embeddings(embeddings, meta.get("count"), meta["dim"])
        if embeddings.shape != (meta.get("count", len(embeddings)), meta["dim"]):
            raise IndexMismatchError(f"embeddings of shape {embeddings.shape} do not fit the index at "
                                     f"{path} ({meta.get('count')} x {meta['dim']})")
        return embeddings
    ref = meta.get("vectors")
    return None if ref is None else load_embeddings(path / ref, meta.get("count"), meta["dim"])


def load_index(path: str | os.PathLike, expect_passages: Optional[str] = None, expect_count: Optional[int] = None,
               expect_encoder: Optional[str] = None, expect_dim: Optional[int] = None,
               embeddings=None, use_gpu: Optional[bool] = None) -> FaissIndex:
    """Read an index folder written by `FaissIndex.save`, checked against what it will be used with.

    expect_*: the passage store's fingerprint and length, the encoder's fingerprint, the query
    dimension; a difference raises IndexMismatchError naming it. embeddings: the fp16 matrix
    (or its path) to use instead of the one recorded in meta.json.
    """
    path = Path(path)
    meta = _read_meta(path)
    _check_expected(path, meta, {"passages": expect_passages, "count": expect_count,
                                 "encoder": expect_encoder, "dim": expect_dim})
    try:
        index = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as e:
        raise IndexError_(f"{path / 'index.faiss'} is not a readable FAISS index: {e}") from None
    if index.ntotal != meta["ntotal"] or index.d != meta["dim"]:
        raise IndexError_(f"{path}: index holds {index.ntotal}x{index.d}, meta.json says {meta['ntotal']}x{meta['dim']}")
    present = np.load(path / "present.npy", allow_pickle=False) if (path / "present.npy").is_file() else None
    params = dict(meta["params"])
    if use_gpu is not None:
        params["use_gpu"] = use_gpu
    extra = {k: meta.get(k) for k in ("count", "passages", "encoder", "step") if k in meta}
    out = FaissIndex(index, meta["kind"], params, meta=extra, vectors=_load_vectors(path, meta, embeddings),
                     present=present)
    if (path / "added_ids.npy").is_file():
        added = np.load(path / "added_vectors.npy", allow_pickle=False)
        out._added = dict(zip(np.load(path / "added_ids.npy", allow_pickle=False).tolist(), added))
    _set_search_params(out.index, params.get("nprobe", 32), params.get("ef_search", 128))
    return out
