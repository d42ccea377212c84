"""MIPS indexes over passage embeddings (DESIGN.md contract #5).

    index = build_index(vectors, "flat")        # float32 (n, d), ids 0..n-1
    scores, ids = index.search(queries, k)       # (q, k) each, best first, inner products
    index.save(path); index = load_index(path)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np


class IndexError_(ValueError):
    """A bad index file or a mismatch between an index and what it is used with."""


class FaissIndex:
    """A FAISS index whose ids are passage rows 0..n-1."""

    def __init__(self, index: faiss.Index, kind: str, params: dict):
        self.index = index
        self.kind = kind
        self.params = params

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: (q, d) -> scores (q, k) float32, ids (q, k) int64, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        assert queries.ndim == 2 and queries.shape[1] == self.dim, \
            f"queries must be (q, {self.dim}), got {queries.shape}"
        if k > self.ntotal:
            raise ValueError(f"k={k} is larger than the index ({self.ntotal} passages)")
        return self.index.search(queries, k)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "index.faiss.tmp"
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path / "index.faiss")
        meta = {"kind": self.kind, "params": self.params, "ntotal": self.ntotal, "dim": self.dim}
        (path / "meta.json.tmp").write_text(json.dumps(meta, indent=2))
        os.replace(path / "meta.json.tmp", path / "meta.json")


def build_index(vectors: np.ndarray, kind: str = "flat", **params) -> FaissIndex:
    """vectors: float32 (n, d), row i gets id i."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (n, d), got shape {vectors.shape}")
    if kind != "flat":
        raise ValueError(f"unknown index kind {kind!r} (expected 'flat')")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return FaissIndex(index, kind, params)


def load_index(path: str | os.PathLike) -> FaissIndex:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise IndexError_(f"{meta_file} not found: not an index folder")
    meta = json.loads(meta_file.read_text())
    try:
        index = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as e:
        raise IndexError_(f"{path / 'index.faiss'} is not a readable FAISS index: {e}") from None
    if index.ntotal != meta["ntotal"] or index.d != meta["dim"]:
        raise IndexError_(f"{path}: index holds {index.ntotal}x{index.d}, meta.json says {meta['ntotal']}x{meta['dim']}")
    return FaissIndex(index, meta["kind"], meta["params"])
