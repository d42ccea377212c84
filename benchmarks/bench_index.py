"""Index kinds on clustered vectors: build time, bytes per passage, queries/s, recall@10 against exact.

    python benchmarks/bench_index.py --n 200000 --d 128 --queries 2000

Vectors are Gaussian blobs (topics) stored as the fp16 matrix index_build writes, memory-mapped
as in production; each index is built from it with the default IndexConfig (plus any
--param overrides), saved, and its folder size divided by n gives bytes per passage. Exact
top-10 comes from torch over the same fp16-rounded vectors; queries/s is for batches of --batch queries at k=10. The last table
scales the measured per-passage bytes to 21M x 768 passages (the paper's Wikipedia index).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from rag_e2e.index import build_index, load_embeddings

PAPER_N, PAPER_D = 21_015_324, 768


def clustered(n: int, d: int, clusters: int, seed: int, noise: float = 0.6, chunk: int = 100_000) -> np.ndarray:
    centers = np.random.default_rng(12345).normal(size=(clusters, d)).astype(np.float32) / np.sqrt(d)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s: s + m] = centers[rng.integers(0, clusters, m)] + noise / np.sqrt(d) * rng.normal(size=(m, d))
    return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, chunk: int = 256) -> tuple[np.ndarray, float]:
    xt = torch.from_numpy(x)
    t0 = time.perf_counter()
    ids = [torch.topk(torch.from_numpy(q[s: s + chunk]) @ xt.T, k).indices for s in range(0, len(q), chunk)]
    return torch.cat(ids).numpy(), time.perf_counter() - t0


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact)]))


def per_passage_bytes(folder: Path, n: int) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name != "meta.json") / n


def scaled_bytes(kind: str, measured: float, d: int, params: dict) -> float:
    """Bytes per passage at d=768: the vector part scales with d, the rest (ids, graph links) does not."""
    vec = {"flat": 4 * d, "hnsw": 4 * d, "sq8": d, "ivfpq": params.get("pq_m", d // 4) * params.get("pq_bits", 8) / 8}
    paper_vec = {"flat": 4 * PAPER_D, "hnsw": 4 * PAPER_D, "sq8": PAPER_D, "ivfpq": PAPER_D // 4}
    return measured - vec[kind] + paper_vec[kind]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=500, help="queries per search call")
    ap.add_argument("--kinds", default="flat,hnsw,sq8,ivfpq")
    ap.add_argument("--param", action="append", default=[], help="kind.key=value, e.g. ivfpq.nprobe=64")
    args = ap.parse_args(argv)
    overrides: dict[str, dict] = {}
    for item in args.param:
        key, value = item.split("=", 1)
        kind, name = key.split(".", 1)
        overrides.setdefault(kind, {})[name] = int(value)

    x = clustered(args.n, args.d, args.clusters, seed=0)
    q = clustered(args.queries, args.d, args.clusters, seed=1)
    x = x.astype(np.float16).astype(np.float32)  # what the fp16 matrix (and so every index) holds
    exact, torch_s = exact_topk(x, q, 10)
    print(f"n={args.n} d={args.d} clusters={args.clusters} queries={args.queries} (batches of {args.batch}), "
          f"faiss threads {faiss.omp_get_max_threads()}; torch exact top-10: {args.queries / torch_s:.0f} q/s")
    rows, flat_qps = [], None
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "embeddings.npy", x.astype(np.float16))
        emb = load_embeddings(Path(tmp) / "embeddings.npy", expect_count=args.n, expect_dim=args.d)
        for kind in args.kinds.split(","):
            t0 = time.perf_counter()
            index = build_index(emb, kind, use_gpu=False, **overrides.get(kind, {}))
            build_s = time.perf_counter() - t0
            index.search(q[: args.batch], 10)  # warm-up
            t0 = time.perf_counter()
            found = np.concatenate([index.search(q[s: s + args.batch], 10)[1] for s in range(0, len(q), args.batch)])
            qps = len(q) / (time.perf_counter() - t0)
            flat_qps = qps if kind == "flat" else flat_qps
            index.save(Path(tmp) / kind)
            size = per_passage_bytes(Path(tmp) / kind, args.n)
            rows.append((kind, build_s, size, qps, recall_at(found, exact), index.params))
            print(f"{kind:6s} build {build_s:7.1f}s  {size:7.1f} B/passage  {qps:9.0f} q/s  "
                  f"recall@10 {rows[-1][4]:.3f}", flush=True)

    print("\n| kind | build (s) | bytes/passage | queries/s | x exact | recall@10 | parameters |")
    print("|---|---|---|---|---|---|---|")
    for kind, build_s, size, qps, rec, p in rows:
        shown = {k: p[k] for k in {"hnsw": ("hnsw_m", "ef_construction", "ef_search"), "ivfpq": (
            "nlist", "nprobe", "pq_m", "pq_bits", "rerank")}.get(kind, ())}
        speed = f"{qps / flat_qps:.1f}" if flat_qps else "-"
        print(f"| {kind} | {build_s:.1f} | {size:.0f} | {qps:.0f} | {speed} | {rec:.3f} | {shown or ''} |")
    print(f"\nScaled to {PAPER_N:,} x {PAPER_D} passages (plus the fp16 embeddings.npy, "
          f"{PAPER_N * PAPER_D * 2 / 2**30:.1f} GiB on disk, memory-mapped):")
    print("| kind | bytes/passage | index size (GiB) |")
    print("|---|---|---|")
    for kind, _, size, _, _, p in rows:
        b = scaled_bytes(kind, size, args.d, p)
        print(f"| {kind} | {b:.0f} | {b * PAPER_N / 2**30:.1f} |")


if __name__ == "__main__":
    main()
